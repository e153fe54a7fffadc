"""What the gateway knows of the LLM provider APIs a route may declare (`api:`)."""
