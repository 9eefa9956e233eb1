# One image for every process of the pipeline; the compose services differ only in the command they pass
# to the `aima-metrics` CLI (e.g. `docker run aima-metrics:local stream`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/aima \
    PATH=/opt/aima/bin:$PATH

RUN groupadd --system --gid 10001 aima \
    && useradd --system --uid 10001 --gid aima --create-home --home-dir /home/aima aima \
    && mkdir -p /opt/aima /src /var/lib/aima \
    && chown aima:aima /opt/aima /src /var/lib/aima

USER aima
WORKDIR /src
COPY --chown=aima:aima . /src
RUN python -m venv /opt/aima \
    && pip install . -c constraints.txt \
    && aima-metrics --help > /dev/null

# Nothing of the source tree is needed at run time: the wheel carries the packages and the Avro schemas.
WORKDIR /home/aima
# 9100: Prometheus self-metrics of every process; 8000: the REST API; 9400: the GPU exporter.
EXPOSE 9100 8000 9400
ENTRYPOINT ["aima-metrics"]
CMD ["--help"]
