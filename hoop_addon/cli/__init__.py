"""The `hoop` command line (`python -m hoop_addon`): `main` builds the parser; one module
per command group (`policy`, `evidence`, `approvals`)."""
