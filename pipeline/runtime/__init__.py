"""How a stage runs, never what it computes: the Ray cluster and task fan-out (`cluster`),
MLflow runs (`tracking`), progress bars (`progress`) and atomic writes (`outputs`).

No stage lists this package as a dependency: nothing here changes a result
(docs/architecture.md, "Dependency policy").
"""
