"""fgvr: training-free fine-grained visual recognition that thinks fast and slow.

Data flow, one file per step: data -> encoder -> knowledge_base -> fast_path -> trigger -> slow_path
-> decision -> evaluate/report. Models only ever come from `fgvr.models.registry`.
"""

__version__ = "0.1.0"
