# dlpipe's container image, from the relocatable release (`make dist`; README "Container image").
# The build context is the folder the release tarball is unpacked in (scripts/image-context):
#
#   scripts/image-context                      # dist/image/<release>/ from dist/<release>.tar.gz
#   buildah bud -t dlpipe:0.1.0 dist/image     # or: docker build -t dlpipe:0.1.0 -f Dockerfile dist/image
#
# The CUDA image differs only in its base and in the release it carries (which adds
# libtorch_cuda and the CUDA libraries; the host's NVIDIA driver comes in at run time):
#
#   scripts/image-context --cuda
#   buildah bud -t dlpipe:0.1.0-cuda --build-arg BASE=nvidia/cuda:13.0.1-base-ubuntu24.04 \
#     --build-arg RELEASE=dlpipe-0.1.0-linux-x86_64-cuda dist/image
#
# Configuration: the release's configs/local.toml (DLPIPE_CONFIG), then DLPIPE__SECTION__KEY
# variables; mount a file of your own and point DLPIPE_CONFIG at it (-v ./dlpipe.toml:/etc/dlpipe/
# dlpipe.toml:ro -e DLPIPE_CONFIG=/etc/dlpipe/dlpipe.toml). Relative paths in it are relative to
# its folder. Secrets: DLPIPE_KAFKA__SASL_PASSWORD (any librdkafka property likewise) from the
# environment or an orchestrator's secret, and certificate files mounted read-only and named by
# [kafka.properties] "ssl.ca.location" and the like. The image runs as the non-root user dlpipe
# (10001); what it writes (snapshots, the feature cache) goes to /var/lib/dlpipe, a volume.
# scripts/rootfs assembles this same file system without a container engine; tests/dist.rs runs
# the entry point in it with chroot.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
ARG RELEASE=dlpipe-0.1.0-linux-x86_64

RUN groupadd --gid 10001 dlpipe \
 && useradd --uid 10001 --gid dlpipe --no-create-home --home-dir /var/lib/dlpipe --shell /usr/sbin/nologin dlpipe \
 && mkdir -p /var/lib/dlpipe/snapshots /var/lib/dlpipe/cache /etc/dlpipe \
 && chown -R dlpipe:dlpipe /var/lib/dlpipe

COPY ${RELEASE} /opt/dlpipe

ENV DLPIPE_CONFIG=/opt/dlpipe/configs/local.toml \
    DLPIPE__METRICS__LISTEN=0.0.0.0:9898 \
    DLPIPE__PIPELINE__SNAPSHOT_DIR=/var/lib/dlpipe/snapshots \
    DLPIPE__TRAIN__FEATURE_CACHE=/var/lib/dlpipe/cache \
    DLPIPE_LOG_FORMAT=json

USER 10001:10001
# The release's root: the built-in defaults (model.dir "models", for a config file that leaves it
# out) are relative to the working directory. What dlpipe writes goes to the volume (ENV above).
WORKDIR /opt/dlpipe
VOLUME /var/lib/dlpipe
EXPOSE 9898

# Ready: every worker has built its dataflow and is consuming, none stalled (src/metrics/
# server.rs). The image has no curl: bash's /dev/tcp asks, on the port of DLPIPE__METRICS__LISTEN.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${DLPIPE__METRICS__LISTEN##*:} && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

ENTRYPOINT ["/opt/dlpipe/bin/dlpipe"]
CMD ["run"]
