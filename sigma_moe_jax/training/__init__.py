"""Training: the pure steps (`step`), the loop (`loop.fit`) and its hooks (`hooks`), the run built
from a config (`run.train`), its settings, inputs and resumption."""
