# phiproxy's container image: the wheel in a virtualenv at /opt/phiproxy (the path the systemd
# unit uses), run as an unprivileged user (uid/gid 10001, as config/kubernetes/phiproxy.yaml
# expects), nothing written outside the mounted audit volume and /tmp.
#
#   docker build -t registry.example.org/phiproxy:0.1.0 .      # tag = proxy.__version__
#   docker run --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
#     --ulimit nofile=65536:65536 -p 6380:6380 -p 9121:9121 \
#     -v /etc/phiproxy:/etc/phiproxy:ro -v phiproxy-audit:/var/lib/phiproxy/audit \
#     registry.example.org/phiproxy:0.1.0
#
# The run flags are the systemd unit's sandbox in Docker's words (ProtectSystem=strict,
# PrivateTmp, CapabilityBoundingSet=, NoNewPrivileges, LimitNOFILE); the image adds what it
# can itself: no setuid/setgid binaries (RestrictSUIDSGID), a numeric non-root USER, an audit
# directory only that user may enter, no pip in the runtime virtualenv. Key files under
# /etc/phiproxy must be owned by uid 10001 and mode 0600: phiproxy refuses any that group or
# others can read. The context is only pyproject.toml, README.md and proxy/ (.dockerignore
# allows nothing else, so no key, certificate or audit file can reach an image layer).
#
# Base: Debian 12 and its python3 (3.11), patched by Debian. BASE may name another Debian 12
# image, e.g. one from a registry mirror.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /build/tools && /build/tools/bin/pip install --no-cache-dir "build>=1.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# the wheel, built as `python -m build` builds it for pip users; its dependencies from PyPI
RUN /build/tools/bin/python -m build --wheel --outdir /dist . \
 && python3 -m venv /opt/phiproxy \
 && /opt/phiproxy/bin/pip install --no-cache-dir /dist/*.whl \
 && /opt/phiproxy/bin/pip uninstall -y pip \
 && /opt/phiproxy/bin/phiproxy --version

FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 phiproxy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin phiproxy \
 && install -d -o root -g phiproxy -m 0750 /etc/phiproxy \
 && install -d -o phiproxy -g phiproxy -m 0700 /var/lib/phiproxy /var/lib/phiproxy/audit \
 && find / -xdev -type f -perm /6000 -exec chmod a-s {} +
COPY --from=build /opt/phiproxy /opt/phiproxy
# bytecode was compiled at install time: nothing to write on a read-only root filesystem
ENV PATH=/opt/phiproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PHIPROXY_HEALTHCHECK_PORT=9121
USER 10001:10001
WORKDIR /var/lib/phiproxy
VOLUME ["/var/lib/phiproxy/audit"]
EXPOSE 6380 9121
STOPSIGNAL SIGTERM
# /healthz on [metrics] port (it must listen on 127.0.0.1 or 0.0.0.0); with metrics off
# (port = 0) run the container with --no-healthcheck. Plain http.client: no proxy variables.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/opt/phiproxy/bin/python", "-c", "import http.client, os, sys; c = http.client.HTTPConnection('127.0.0.1', int(os.environ['PHIPROXY_HEALTHCHECK_PORT']), timeout=2); c.request('GET', '/healthz'); sys.exit(c.getresponse().status != 200)"]
ENTRYPOINT ["/opt/phiproxy/bin/phiproxy"]
CMD ["run", "-c", "/etc/phiproxy/phiproxy.toml"]
