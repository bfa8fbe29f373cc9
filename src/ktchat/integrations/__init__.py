"""Hooks that let other tools load models through ktchat; each is inert until its tool is imported.

llamafactory: `llamafactory-cli chat | api | webchat` with `use_kt: true` load through `ktchat.load_model`
(docs/llamafactory.md).
"""
