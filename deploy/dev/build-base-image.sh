#!/usr/bin/env bash
# Build a stand-in for the Dockerfile's base image where no registry can be reached.
#
#   bash deploy/dev/build-base-image.sh      # needs root, mmdebstrap and a running engine
#
# The name comes from the Dockerfile's FROM lines (today python:3.11.13-slim-bookworm). The
# stand-in is Debian bookworm minbase (the package set of the official debian:bookworm-slim,
# which debuerreotype builds with the same variant) with Debian's python3 and python3-venv,
# made to look like the official python image where the Dockerfile relies on it:
#   - `python` and `pip` in /usr/local/bin, on PATH;
#   - pip, setuptools and wheel installed by pip into /usr/local (with their RECORD files), so
#     that `pip uninstall` removes them as it does in the official image (Debian's python3-pip
#     only bootstraps them and is purged again);
#   - tzdata (Priority: required in bookworm, so in the slim images; kombu's timer needs the
#     zone database on Linux: without it `celery worker` dies on import);
#   - no EXTERNALLY-MANAGED marker; groupadd/useradd (passwd); no perl (usrmerge pulls it in
#     while the root file system is made; usr-is-merged stands in for it afterwards).
# Only the stand-in trusts this machine's extra CA certificates (a TLS-intercepting proxy sits
# between it and PyPI): /usr/local/share/ca-certificates/*.crt go into its trust store and
# /etc/pip.conf points pip at the system bundle. The product's Dockerfile knows nothing of them.
# The stand-in is NOT the official image (Debian's Python 3.11.2, not 3.11.13): it proves that
# the Dockerfile builds and the image runs, not which CPython patch release users get.
#
# Idempotent: nothing is built when the tag already exists (CHE_REBUILD_BASE=1 forces it).
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
dockerfile="${1:-$here/Dockerfile}"

fail() { echo "build-base-image: $*" >&2; exit 1; }

# Every FROM that is not a stage of the Dockerfile itself names the base.
mapfile -t bases < <(awk '
  toupper($1) == "FROM" {
    image = ""; for (i = 2; i <= NF; i++) if ($i !~ /^--/) { image = $i; break }
    if (toupper($(i + 1)) == "AS") stages[tolower($(i + 2))] = 1
    if (!(tolower(image) in stages)) print image
  }' "$dockerfile" | sort -u)
[ "${#bases[@]}" = 1 ] || fail "expected one base image in $dockerfile, found: ${bases[*]:-none}"
base="${bases[0]}"

command -v docker >/dev/null || fail "no docker client on PATH"
docker info >/dev/null 2>&1 || fail "no Docker engine answers (run deploy/dev/start-docker.sh and export DOCKER_HOST)"
if [ -z "${CHE_REBUILD_BASE:-}" ] && docker image inspect "$base" >/dev/null 2>&1; then
  echo "build-base-image: $base already exists"
  exit 0
fi
command -v mmdebstrap >/dev/null || fail "no mmdebstrap on PATH (apt-get install mmdebstrap)"
[ "$(id -u)" = 0 ] || fail "mmdebstrap's root mode needs root"

case "$base" in
  *bookworm*) suite=bookworm ;;
  *) fail "$base: only a bookworm base can be stood in for" ;;
esac

cas=(/usr/local/share/ca-certificates/*.crt)
[ -e "${cas[0]}" ] || cas=()

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ "${#cas[@]}" -gt 0 ]; then cp "${cas[@]}" "$work/"; fi
cat >"$work/pip.conf" <<'EOF'
[global]
cert = /etc/ssl/certs/ca-certificates.crt
EOF

echo "build-base-image: building $base with mmdebstrap ($suite)" >&2
start=$SECONDS
# The host's pip settings (PIP_FIND_LINKS, constraints in /etc/xdg/pip, ...) must not reach
# the chroot: its pip runs with a clean environment.
chroot_env=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root)
mmdebstrap --quiet --mode=root --variant=minbase --format=tar \
  --include=usr-is-merged,ca-certificates,passwd,tzdata,python3,python3-venv,python3-pip \
  --customize-hook="mkdir -p \"\$1/usr/local/share/ca-certificates\"" \
  --customize-hook="find '$work' -name '*.crt' -exec cp {} \"\$1/usr/local/share/ca-certificates/\" \\;" \
  --customize-hook="cp '$work/pip.conf' \"\$1/etc/pip.conf\"" \
  --customize-hook="chroot \"\$1\" ${chroot_env[*]} update-ca-certificates --fresh >/dev/null 2>&1" \
  --customize-hook="rm -f \"\$1\"/usr/lib/python3*/EXTERNALLY-MANAGED" \
  --customize-hook="chroot \"\$1\" ${chroot_env[*]} python3 -m pip install --no-cache-dir --quiet --disable-pip-version-check --root-user-action=ignore --ignore-installed pip setuptools wheel" \
  --customize-hook="chroot \"\$1\" ${chroot_env[*]} apt-get purge --yes --quiet --auto-remove python3-pip usrmerge perl libperl5.36 perl-modules-5.36 >/dev/null" \
  --customize-hook="ln -sf /usr/bin/python3 \"\$1/usr/local/bin/python\"" \
  --customize-hook="chroot \"\$1\" ${chroot_env[*]} sh -c 'test -e /usr/share/zoneinfo/UTC && python --version && python -m pip --version && pip --version && command -v useradd && command -v groupadd' >/dev/null" \
  --customize-hook="rm -rf \"\$1\"/var/lib/apt/lists/* \"\$1\"/var/cache/apt/*.bin \"\$1\"/root/.cache" \
  "$suite" "$work/rootfs.tar" \
  || fail "mmdebstrap could not build the root file system of $base (see above)"
# Imported only once complete: a failed mmdebstrap leaves no half-built image under the tag.
docker import \
      --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["python3"]' \
      --message "stand-in for $base built by deploy/dev/build-base-image.sh" \
      "$work/rootfs.tar" "$base" >/dev/null \
  || fail "docker import of $base failed (see above)"
docker run --rm "$base" python -c 'import ssl, venv' \
  || fail "$base was built but its python does not start"
echo "build-base-image: $base built in $((SECONDS - start))s ($(docker image inspect -f '{{.Size}}' "$base") bytes)"
