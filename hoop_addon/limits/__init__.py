"""Rate limits and budgets: sliding-window counters (`counter`) and the token usage
LLM providers report (`usage`)."""
