# One image for every process of the pipeline; the compose services differ only in the command they pass
# to the `aima-metrics` CLI (e.g. `docker run aima-metrics:local stream`).

# The web console's chart library, from the npm registry as ./dev setup installs it (the same version:
# tests/test_compose.py checks); only its two files go into the image.
FROM node:22-slim AS console-library
ARG UPLOT_VERSION=1.6.32
RUN npm install --prefix /ui --no-audit --no-fund --loglevel=error "uplot@${UPLOT_VERSION}"

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

COPY --from=console-library /ui/node_modules/uplot/dist/uPlot.iife.min.js /ui/node_modules/uplot/dist/uPlot.min.css /opt/aima/console/
ENV AIMA_API_UI_LIBRARY_DIR=/opt/aima/console

# Nothing of the source tree is needed at run time: the wheel carries the packages and the Avro schemas.
WORKDIR /home/aima
# 9100: Prometheus self-metrics of every process; 8000: the REST API; 9400: the GPU exporter.
EXPOSE 9100 8000 9400
ENTRYPOINT ["aima-metrics"]
CMD ["--help"]
