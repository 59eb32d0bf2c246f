# pyrunc in a box: Debian with containerd, runc and pyrunc, configured to run the demo.
#   docker build -t pyrunc .
#   docker run --rm --privileged --cgroupns=host pyrunc            # runs tools/try
#   docker run --rm --privileged --cgroupns=host pyrunc sh -c 'echo hi; exit 3'
# The install steps are exactly the tested ones: tools/setup.sh (checked by tests/unit/test_dockerfile.py).
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY . /opt/pyrunc
WORKDIR /opt/pyrunc
RUN bash tools/setup.sh "" && rm -rf /var/lib/apt/lists/* \
    && ln -s /opt/pyrunc/.venv/bin/containerd-shim-pyrunc-v2 /usr/local/bin/containerd-shim-pyrunc-v2
ENTRYPOINT ["bash", "tools/try"]
