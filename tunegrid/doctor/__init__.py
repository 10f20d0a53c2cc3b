"""`tunegrid doctor`: a read-only preflight of a real workspace and the deployed app (see docs/doctor.md).

Pure checks (`roles`, `quota`, `events`, and the model lifecycle of `shared.adapters.azureml`) judge the
documents that `reads.AzureReads`, the one HTTP layer, fetches; `diagnose` runs them in order and
`report` renders the rows.
"""
