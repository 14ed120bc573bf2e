"""What `params.yaml` may say: the typed sections (`settings`) and the schema of the whole file
with its loader (`schema`). Torch-free, so a bad key is reported before anything heavy loads.

No stage lists this package as a dependency: DVC tracks the values themselves, key by key
(docs/architecture.md, "Dependency policy").
"""
