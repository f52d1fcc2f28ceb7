"""The paper's findings as studies at small scale: the runs each study needs and what it measures
from their metrics (see docs/reproduction.md and docs/design.md, "What the paper observed").

A run ("variant") is the base config of configs/reproduce.py with a few changes; a
study names the variants it compares and turns their metrics.jsonl into results (a JSON-ready
dict) and figures. Variants are shared: the plain-LBL run serves seven studies and is trained once.

  variants.py     each variant's config (building one writes nothing)
  domain_data.py  the English / Python corpus of the domains study, written before training
  runs.py         a trained variant's metrics.jsonl read back as a `Run`; shipped (compact) runs
  analyses/      each study's numbers (NumPy only, no matplotlib)
  figures.py      each study's figures (matplotlib)
  registry.py     the studies by name, and training their variants
  balance.py      the balance search's candidates and measurements (experiments/balance_search.py)
  corpus.py       facts about a config's training corpus (experiments/corpus_report.py)
"""

from experiments.studies import analyses, figures
from experiments.studies.analyses import domain_information
from experiments.studies.domain_data import domain_paths, prepare_domains, python_stdlib_documents
from experiments.studies.registry import (STUDIES, Study, prepare_data, selected_studies,
                                          train_variant, variant_order)
from experiments.studies.runs import Run, compact, joined, read_run, read_shipped, write_shipped
from experiments.studies.variants import (DOMAIN_MESH_DATA, DOMAIN_MODES, DOMAIN_VARIANTS,
                                          SWITCH_FRACTION, VARIANTS, branch_step, phase1_top_k,
                                          variant_config)
