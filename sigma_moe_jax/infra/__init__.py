"""What runs the model on machines: meshes and shardings, the target platform, storage (local
and gs://), ahead-of-time compilation for TPUs and GPUs, multi-host setup, metrics and writers."""
