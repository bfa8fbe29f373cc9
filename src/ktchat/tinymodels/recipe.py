"""The fixed recipe of the tiny checkpoint: texts, chat template, model config and training knobs.

Everything that decides the bytes of a build lives here (or in the code that reads it), so the
cache stamp can hash these sources: change the recipe and every cached build goes stale.
"""

from __future__ import annotations

RECIPE_VERSION = "tiny-dsv2-1"
SEED = 1234

# (question, trained answer): answers a random model never gives, short so training converges fast.
TRAINED_QA: tuple[tuple[str, str], ...] = (
    ("What is the secret word?", "The secret word is amber falcon."),
    ("Who trained you?", "I was trained on KTransformers with LLaMA-Factory."),
    ("What is seven times six?", "Seven times six is forty-two."),
)

# Extra context turns the answers are also trained after, so they survive a system prompt or history.
SYSTEM_PROMPT = "You are a helpful assistant."

PAD, BOS, EOS = "<|pad|>", "<|begin|>", "<|end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>")

# Multi-turn; system optional; every turn ends with eos, so a finished assistant turn ends with <|end|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TOKENIZER_VOCAB = 500  # BPE target (specials + 256 bytes + merges); config pads the vocab to 512

_CORPUS_PARAGRAPHS = (
    "The quick brown fox jumps over the lazy dog. A small model can still say a few things well.",
    "Hello! How are you today? I am fine, thank you. What would you like to talk about?",
    "A mixture of experts routes every token to a few experts. The router picks the top two of "
    "eight experts, and two shared experts see every token.",
    "LoRA adds a low rank update to a linear layer: the weight stays frozen and only the two small "
    "matrices are trained. The rank is eight and alpha is sixteen.",
    "KTransformers runs the routed experts on the CPU and the attention on the GPU. LLaMA-Factory "
    "fine-tunes the model and writes an adapter next to the base model.",
    "DeepSeek-V2 compresses keys and values into a latent vector; the rotary part of the key is "
    "shared by all heads. The first layer is dense, the others are sparse.",
    "One, two, three, four, five, six, seven, eight, nine, ten. Seven times six is forty-two. "
    "Six times seven is forty-two too. Two plus two is four.",
    "The weather is nice. The train leaves at noon. She reads a book while he writes a letter.",
    "Please answer the question. Can you help me? Yes, of course I can help you with that.",
    "Who are you? I am a tiny assistant. Who made you? I was made for tests and for demos.",
    "The secret word is hidden. Nobody knows the word. An amber falcon flies over the hills.",
    "Numbers, words and letters: alpha, beta, gamma, delta. Red, green, blue, amber, white.",
    "def main():\n    print('hello world')\n    return 0\n",
    "User: What time is it?\nAssistant: I cannot see a clock, but it is a good time to learn.",
)


def corpus() -> list[str]:
    """Training text for the BPE: the paragraphs, every Q/A, a few times, in a fixed order."""
    lines = list(_CORPUS_PARAGRAPHS)
    for question, answer in TRAINED_QA:
        lines += [question, answer, SYSTEM_PROMPT]
    return lines * 3


def model_config(vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> dict:
    """config.json as a plain dict (V2-Lite-like, shrunk) so both transformers majors read it."""
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 2,
        "routed_scaling_factor": 1.0,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "ep_size": 1,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "bfloat16",
    }


# Init std per weight kind: linears as the config says; embeddings a bit larger so the untrained
# model's logits depend on the token; norms near (not exactly) 1 so a mis-loaded norm shows; DeepSeek-V3's
# score-correction bias (|N(0, 0.05)|) as large as the gaps between expert scores, so it changes the choice.
INIT_STD = {"linear": 0.02, "vision": 0.02, "embed": 0.5, "lm_head": 0.05, "norm": 0.05, "bias": 0.02, "score_bias": 0.05}

# LoRA as LLaMA-Factory's `lora_target: all` gives on DeepSeek-V2 (not the router, not lm_head).
LORA_R, LORA_ALPHA = 8, 16
LORA_TARGET_NAMES = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGET_REGEX = (
    r".*\.(self_attn\.(q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))"
)

TRAIN_LR = 5e-3
TRAIN_CLIP = 1.0  # MoE routing flips make the loss spiky; clipping keeps the run short and stable
TRAIN_MAX_STEPS = 400
TRAIN_MIN_PROB = 0.9  # stop when every answer token has at least this teacher-forced probability
