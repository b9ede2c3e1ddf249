# The one image of every midas-recon service (docker-compose.yml): worker, beat, migrations,
# Flower, simulator. Dependencies are installed from requirements.lock BEFORE the code is
# copied: a code change rebuilds only the last layers (seconds), and an image built next month
# has the versions that were tested.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY requirements.lock ./
RUN pip install --no-deps -r requirements.lock

# The package itself, without touching the locked dependencies; `pip check` fails the build
# when the lock misses or contradicts a dependency of pyproject.toml.
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-deps '.[ops]' \
 && pip check \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/midas-recon midas \
 && rm -rf /src

# Never root: the worker holds session keys and Midas credentials in memory.
USER midas
WORKDIR /var/lib/midas-recon
CMD ["midas-recon", "--help"]
