"""Generation over a loaded model: prompts (one rule for chat, api and tests), the chat session, the api's engine."""

from .prompts import LFTemplate, Prompts, check_template, llamafactory_template
from .session import ChatSession, open_session

__all__ = ["ChatSession", "LFTemplate", "Prompts", "check_template", "llamafactory_template", "open_session"]
