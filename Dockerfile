# syntax=docker/dockerfile:1
# PlexiChat node image, built offline: `invoke docker.build`.
#
# No registry is reachable, so both bases are local images made by
# `invoke docker.base` (mmdebstrap of the host's Debian release from the host's
# own apt sources, imported through the Docker SDK).  Python dependencies come
# from wheelhouses in the build context (build/docker/wheels/, filled by
# `invoke docker.build` with `pip download` at the versions pinned in
# constraints.txt), so the build needs no network.
ARG BASE=plexilab/debian-base:bookworm
ARG BUILD_BASE=plexilab/debian-build:bookworm

# -- builder: Cython extensions + the plexichat wheel ----------------------------
FROM ${BUILD_BASE} AS builder
ENV PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# Build tools first (the `build` group at the locked versions, downloaded by
# `invoke docker.build`): this layer only changes with the wheelhouse.
COPY build/docker/wheels/build /wheels/build
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install -q /wheels/build/*.whl
WORKDIR /src
COPY setup.py pyproject.toml README.md ./
COPY src/plexichat ./src/plexichat
ARG PLEXICHAT_OPT=-O3
RUN PLEXICHAT_REQUIRE_EXTENSIONS=1 PLEXICHAT_OPT=${PLEXICHAT_OPT} CFLAGS=-g0 \
    PLEXICHAT_CYTHON_JOBS=2 \
    /opt/build/bin/pip wheel -q --no-build-isolation --no-deps -w /dist . \
 && ls -l /dist

# -- runtime: the wheel and its runtime dependencies only -------------------------
FROM ${BASE} AS runtime
ENV PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN echo 'plexichat:x:10001:10001:PlexiChat node:/var/lib/plexichat:/usr/sbin/nologin' \
        >> /etc/passwd \
 && echo 'plexichat:x:10001:' >> /etc/group \
 && mkdir -p /var/lib/plexichat \
 && chown 10001:10001 /var/lib/plexichat
# Runtime dependencies (the `runtime` group, pinned): cached until that
# wheelhouse changes.
COPY build/docker/wheels/runtime /wheels/runtime
RUN python3 -m venv /opt/plexichat \
 && /opt/plexichat/bin/pip install -q /wheels/runtime/*.whl \
 && rm -rf /wheels
# The wheel from the builder stage; only this layer changes with the source.
COPY --from=builder /dist/ /tmp/dist/
RUN /opt/plexichat/bin/pip install -q --no-deps /tmp/dist/plexichat-*.whl \
 && rm -rf /tmp/dist \
 && /opt/plexichat/bin/python -m plexichat.accel --require-compiled
ENV PATH=/opt/plexichat/bin:$PATH \
    PLEXICHAT_HEALTH=127.0.0.1:7000
USER 10001:10001
WORKDIR /var/lib/plexichat
EXPOSE 7000
# A framed PING must come back as a PONG (docs/protocol.md: empty-body PING is
# a plain liveness check).  PLEXICHAT_HEALTH names the node's listen address.
HEALTHCHECK --interval=2s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/opt/plexichat/bin/python", "-c", "import os,socket;from plexichat.wire import encode_frame,decode_frames;h,_,p=os.environ['PLEXICHAT_HEALTH'].rpartition(':');s=socket.create_connection((h,int(p)),2);s.settimeout(2);s.sendall(encode_frame(17,1,b''));raise SystemExit(decode_frames(s.makefile('rb').read(16))[0].type!=18)"]
ENTRYPOINT ["plexichat-node"]
CMD ["--node-id", "n0", "--listen", "127.0.0.1:7000", "--data-dir", "/var/lib/plexichat/data"]
LABEL org.opencontainers.image.title="plexichat-node" \
      io.plexilab.component="plexichat"
