import os
# Notebooks and demos run at test size; keep CPU runs deterministic and light on the 2-core CI machine.
os.environ.setdefault('MEDSSM_QUICK', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
if os.environ.get('PYTEST_XDIST_WORKER'):
    # one BLAS/OpenMP thread per test worker: the workers already use every core
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    os.environ.setdefault('MKL_NUM_THREADS', '1')
