"""kt_kernel's native output stays out of the conversation: `ktchat chat`, `ktchat demo` and `ktchat api` in real
processes with the kt experts, then ktchat.experts.native_output's capture on its own (fds, threads, errors)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ktchat.cli.chat import WELCOME
from ktchat.tinymodels import TRAINED_QA

REPO = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
# What kt_kernel 0.7.2 prints from C++ when a pool or kernel is made and when the pool goes (seen on avx2,
# avx512 and amx builds); the allowlists below catch any other line too.
NATIVE = re.compile(r"CPUInfer\[|WorkerPool\[|NumaPool|Numa Worker Pool|TP MOE|_MOE_TP|TP_MOE_SFT|online quant")


@pytest.fixture(scope="module")
def kt_here():
    pytest.importorskip("kt_kernel")
    from ktchat.experts import kt_backend

    reason = kt_backend.unavailable_reason("merged", "bf16")
    if reason:
        pytest.skip(reason)


KTCHAT = [sys.executable, "-m", "ktchat.cli"]  # the `ktchat` command's own entry point


def ktchat(*args, stdin="") -> subprocess.CompletedProcess:
    return subprocess.run([*KTCHAT, *map(str, args)], input=stdin, capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, **ENV})


def conversation() -> str:
    """Each trained question, `clear` between them, then `exit`."""
    return "".join(f"{question}\nclear\n" for question, _ in TRAINED_QA) + "exit\n"


def assert_only_repl_lines(stdout: str, extra=()) -> None:
    """stdout holds the banner, the prompts with their answers, `clear`'s line and `extra` (the demo's list)."""
    allowed = {WELCOME, "", "User: ", "History has been removed.", "User: History has been removed.", *extra}
    allowed |= {f"User: Assistant: {answer}" for _, answer in TRAINED_QA}
    assert [line for line in stdout.splitlines() if line not in allowed] == [], stdout
    for _, answer in TRAINED_QA:
        assert f"Assistant: {answer}\n" in stdout, stdout


def assert_only_ktchat_log(stderr: str) -> None:
    assert [line for line in stderr.splitlines() if line and not line.startswith("[ktchat] ")] == [], stderr
    assert "[ktchat] kt_kernel worker pool:" in stderr  # the kt experts ran: the native code had its say


@pytest.mark.parametrize("moe_lora", ["merged", "exact"])
def test_ktchat_chat_with_kt_experts_prints_only_the_conversation(kt_here, tiny, tmp_path, moe_lora):
    """merged: the inference kernel (every build); exact: the SFT kernel, which prints more (AVX-512 BF16, AMX)."""
    from ktchat.experts import kt_backend

    if kt_backend.unavailable_reason(moe_lora, "bf16"):
        pytest.skip(kt_backend.unavailable_reason(moe_lora, "bf16"))
    config = tmp_path / "chat.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny.model), "adapter_name_or_path": str(tiny.adapter), "use_kt": True,
        "experts_backend": "kt", "moe_lora": moe_lora, "do_sample": False, "max_new_tokens": 32}))
    out = ktchat("chat", config, stdin=conversation())
    assert out.returncode == 0, out.stderr[-3000:]
    assert_only_repl_lines(out.stdout)
    assert_only_ktchat_log(out.stderr)
    assert f"[ktchat] kt experts: moe_lora={moe_lora}, method=bf16" in out.stderr


def test_ktchat_demo_prints_only_the_questions_and_the_conversation(kt_here, tiny, tmp_path):
    cache = tmp_path / "demo"  # a copy of the built tiny model: the demo reuses a complete build as it is
    for part in ("model", "adapter"):
        shutil.copytree(tiny.root / part, cache / part)
    shutil.copy(tiny.root / "tiny-stamp.json", cache)
    out = ktchat("demo", "--cache", cache, stdin=conversation())
    assert out.returncode == 0, out.stderr[-3000:]
    questions = ["The demo adapter was trained on these questions; ask one:", *(f"  {q}" for q, _ in TRAINED_QA)]
    assert out.stdout.startswith("\n".join(questions) + "\n" + WELCOME + "\n"), out.stdout
    assert_only_repl_lines(out.stdout, extra=questions)
    assert_only_ktchat_log(out.stderr)
    assert "building tiny" not in out.stderr  # the copy was reused, not rebuilt


def test_server_log_has_no_native_lines(kt_here, tiny, tmp_path):
    from servers import get_json, start_server

    config = tmp_path / "api.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny.model), "adapter_name_or_path": str(tiny.adapter), "template": "default",
        "use_kt": True, "experts_backend": "kt", "do_sample": False, "max_new_tokens": 32}))
    log = tmp_path / "server.log"
    proc, url = start_server(config, log, command=[*KTCHAT, "api"], env=ENV)
    try:
        assert get_json(url + "/health")["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    text = log.read_text()
    assert "kt_kernel worker pool:" in text and "Application shutdown complete" in text, text
    assert [line for line in text.splitlines() if NATIVE.search(line)] == [], text


KEEP_OR_DROP = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, format="[ktchat] %(name)s %(message)s")
from ktchat import load_model
model, tokenizer = load_model(sys.argv[1], sys.argv[2], experts_backend="kt", device="cpu")
if sys.argv[3] == "drop":
    del model
print("loaded")
"""


@pytest.mark.parametrize("at_exit", ["drop", "keep"])
def test_python_programs_exit_quietly_with_or_without_a_model_left(kt_here, tiny, at_exit):
    """drop: the pool is torn down at exit, its goodbye captured; keep (a model in a module global at exit): the
    pool outlives the kernels and says nothing."""
    out = subprocess.run([sys.executable, "-c", KEEP_OR_DROP, str(tiny.model), str(tiny.adapter), at_exit],
                         capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    assert out.returncode == 0 and out.stdout == "loaded\n", (out.stdout, out.stderr[-3000:])
    goodbye = [line for line in out.stderr.splitlines() if "Goodbye" in line]
    if at_exit == "drop":
        assert len(goodbye) == 1 and " kt_kernel worker pool at exit: CPUInfer[" in goodbye[0], out.stderr
    else:
        assert goodbye == [] and "kt_kernel worker pool left to the OS at exit" in out.stderr


# ---------------------------------------------------------------------------------------------------------------
# The capture itself, in a child process whose fds 1 and 2 are pipes (as under a server or a test)

CHILD = """
import ctypes, logging, os, sys, threading
from ktchat.experts.native_output import captured
libc = ctypes.CDLL(None)
logging.basicConfig(level=logging.DEBUG, format="[%(threadName)s] %(name)s %(levelname)s %(message)s")
"""


def run_child(body: str) -> subprocess.CompletedProcess:
    code = CHILD + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr
    return out


def test_native_writes_to_fds_1_and_2_go_to_the_debug_log():
    out = run_child("""
        print("before", flush=True)
        libc.printf(b"pending C text\\n")  # C's stdout is block-buffered on a pipe: flushed before the switch
        with captured("probe"):
            libc.printf(b"native on stdout\\n")  # stays in C's buffer until the capture flushes it
            os.write(2, b"native on stderr\\n")
            print("python in the window")
        print("after", flush=True)
        libc.printf(b"C after\\n"); libc.fflush(None)
    """)
    assert out.stdout.splitlines() == ["before", "pending C text", "after", "C after"]
    prefix = "[MainThread] ktchat.experts.native_output DEBUG probe: "
    assert sorted(out.stderr.splitlines()) == [prefix + s for s in ("native on stderr", "native on stdout",
                                                                     "python in the window")]


def test_other_threads_log_lines_reach_stderr_while_the_window_is_open():
    out = run_child("""
        import time
        log = logging.getLogger("elsewhere")
        inside = threading.Event()

        def chatter():
            inside.wait()
            for i in range(200):
                log.info("line %d", i)

        thread = threading.Thread(target=chatter, name="other")
        thread.start()
        with captured("probe"):
            inside.set()
            for _ in range(20):
                libc.printf(b"native\\n")
                time.sleep(0.005)
        thread.join()
    """)
    lines = out.stderr.splitlines()
    assert [line for line in lines if "elsewhere" in line] == [
        f"[other] elsewhere INFO line {i}" for i in range(200)]
    assert lines.count("[MainThread] ktchat.experts.native_output DEBUG probe: native") == 20
    assert out.stdout == ""


def test_concurrent_windows_are_serialised_and_each_keeps_its_own_lines():
    out = run_child("""
        def work(name):
            for i in range(30):
                with captured(name):
                    libc.printf(f"{name} {i}\\n".encode())
                    with captured("nested"):  # part of the outer window
                        os.write(1, f"{name} {i} inner\\n".encode())

        threads = [threading.Thread(target=work, args=(n,), name=n) for n in ("a", "b", "c")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("fds back", flush=True)
    """)
    assert out.stdout == "fds back\n"
    for name in "abc":
        mine = [line.split(" DEBUG ", 1)[1] for line in out.stderr.splitlines() if line.startswith(f"[{name}]")]
        assert sorted(mine) == sorted([f"{name}: {name} {i}" for i in range(30)] +
                                      [f"{name}: {name} {i} inner" for i in range(30)]), mine


def test_a_failing_call_logs_what_it_printed_as_a_warning_and_restores_the_fds():
    out = run_child("""
        before = os.fstat(1).st_ino, os.fstat(2).st_ino
        try:
            with captured("probe"):
                libc.printf(b"why it failed\\n")
                raise RuntimeError("kernel refused")
        except RuntimeError as exc:
            print("raised:", exc, flush=True)
        assert (os.fstat(1).st_ino, os.fstat(2).st_ino) == before
    """)
    assert out.stdout == "raised: kernel refused\n"
    assert out.stderr.splitlines() == ["[MainThread] ktchat.experts.native_output WARNING probe: why it failed"]
