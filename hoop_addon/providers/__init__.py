"""What the gateway knows of the LLM provider APIs a route may declare (`api:`)."""

# Where agents and their SDKs put an API key (OpenAI and most: Authorization; Anthropic:
# X-Api-Key; Azure OpenAI: Api-Key; Google: X-Goog-Api-Key).
CREDENTIAL_HEADERS = ("Authorization", "X-Api-Key", "Api-Key", "X-Goog-Api-Key")
