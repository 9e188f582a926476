import os
# Notebooks and demos run at test size; keep CPU runs deterministic and light on the 2-core CI machine.
os.environ.setdefault('MEDSSM_QUICK', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
