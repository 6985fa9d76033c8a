"""An example agent package for chat-gateway (see docs/agents.md)."""
