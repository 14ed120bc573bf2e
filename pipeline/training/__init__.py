"""Training: the one loop (`loop`), the device options it applies (`compute`), each training
stage's job (`jobs`), the Ray Train adapter that runs a job as a `TorchTrainer` (`ray_train`)
and failure injection for the fault tests (`faults`).
"""
