"""Development tools: local CA, fake OpenAI-compatible upstream."""
