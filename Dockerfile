# gemmakit serve in a container: the OpenAI-compatible server on port 8000, the nano model by default.
#   docker build -t gemmakit .                                    # CPU image (PyTorch's CPU wheel)
#   docker build -t gemmakit-cuda --build-arg TORCH_VARIANT=cu128 .   # CUDA 12.8 wheel (run with --gpus all)
#   docker run -p 8000:8000 -e GEMMAKIT_API_KEY=... gemmakit
#   docker run -p 8000:8000 -v ~/gemma-2-2b-it:/model:ro gemmakit --model /model --device cuda
# Inside a container the server must bind 0.0.0.0; set GEMMAKIT_API_KEY, or anyone reaching the port can use it.
ARG PYTHON=3.11
FROM python:${PYTHON}-slim
ARG TORCH_VARIANT=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/gemmakit
# g++ builds the native quantized kernels on first use (the server falls back to PyTorch without it)
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN pip install --index-url https://download.pytorch.org/whl/${TORCH_VARIANT} torch==2.13.0
COPY pyproject.toml README.md ./
COPY gemmakit ./gemmakit
COPY recipes ./recipes
RUN pip install ".[serve]"
RUN useradd --create-home gemma
USER gemma
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
ENTRYPOINT ["gemmakit", "serve", "--host", "0.0.0.0", "--port", "8000"]
