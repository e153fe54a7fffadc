"""Policy as code: the typed model (`model`), its YAML loader (`loader`), block and
approval conditions (`conditions`), the chain's simulation (`simulate`) and policy
unit tests (`testing`)."""
