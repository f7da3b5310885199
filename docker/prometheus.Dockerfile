# Prometheus from Debian's package, for machines that reach Debian's mirrors but no image registry
# (docker-compose.ci.yml). It runs with the command line of docker-compose.yml's prometheus service.
#   docker build -f docker/prometheus.Dockerfile -t cats-serve-prometheus .
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# The distribution's release is the version pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown prometheus:prometheus /prometheus
VOLUME ["/prometheus"]
# The package makes "prometheus" a system user, whose uid it picks at install time.
# hadolint ignore=DL3066
USER prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
