# syntax=docker/dockerfile:1
#
# genai-task-exporter container image.
#
#   docker build -t genai-task-exporter:dev .
#   docker run --rm -p 9850:9850 -p 9851:9851 genai-task-exporter:dev \
#     demo --web.listen-address=0.0.0.0:9850 --simulator.listen-address=0.0.0.0:9851
#
# The runtime image is distroless: no shell, no package manager, no curl. It carries the
# Debian CA bundle (/etc/ssl/certs), which the exporter's TLS client (rustls with the platform
# verifier) loads at start-up, and glibc/libgcc, which the binary links against.

ARG RUST_VERSION=1.95.0

# ---- builder -----------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /build

# 1. Dependencies only. This layer is rebuilt only when Cargo.toml or Cargo.lock change.
#    Every target the manifest declares gets a stub source file, so the manifest parses
#    without the real sources ([[bench]], [[test]], [[example]] with the default path).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && : > src/lib.rs \
    && awk -F'"' ' \
         /^\[\[bench\]\]/   { dir = "benches";  next }; \
         /^\[\[test\]\]/    { dir = "tests";    next }; \
         /^\[\[example\]\]/ { dir = "examples"; next }; \
         /^\[/              { dir = "" }; \
         dir != "" && /^name *=/ { print dir "/" $2 ".rs" }' Cargo.toml \
       | while read -r stub; do mkdir -p "$(dirname "$stub")"; echo 'fn main() {}' > "$stub"; done \
    && cargo build --release --locked \
    && rm -rf src

# 2. The exporter itself. touch: COPY keeps the build context's mtimes, which may be older
#    than the stub build above; cargo must see the real sources as newer.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/genai-task-exporter /out/genai-task-exporter \
    && mkdir -p /out/state

# ---- runtime -----------------------------------------------------------------------------
# distroless/cc: glibc + libgcc + CA certificates + /etc/passwd entry "nonroot" (65532).
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="genai-task-exporter" \
      org.opencontainers.image.description="Prometheus exporter for asynchronous AI image/video generation tasks (maxapi.io, apimall.ai)" \
      org.opencontainers.image.version="${VERSION}"

COPY --from=builder /out/genai-task-exporter /usr/local/bin/genai-task-exporter

# State (config `state.path`): the embedded store that keeps tracked tasks and counted outcomes
# across restarts. Owned by the runtime user, so that a fresh named volume (initialised from
# this directory) is writable; mount a volume here, an anonymous one is created otherwise.
COPY --from=builder --chown=65532:65532 /out/state/ /var/lib/genai-task-exporter/
WORKDIR /var/lib/genai-task-exporter
VOLUME ["/var/lib/genai-task-exporter"]

USER 65532:65532
EXPOSE 9850

# No HEALTHCHECK: the image has no shell or HTTP client to run one. Probe from outside instead:
#   liveness:  GET /-/healthy  (200 while the process is up)
#   readiness: GET /-/ready    (200 once state is loaded and every provider was polled once)
# See deploy/README.md ("Probes").
ENTRYPOINT ["/usr/local/bin/genai-task-exporter"]
CMD ["--config.file=/etc/genai-task-exporter/config.yaml"]
