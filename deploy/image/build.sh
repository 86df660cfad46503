#!/usr/bin/env bash
# The container image's build steps, run by deploy/Dockerfile and by the test suite
# (tests/image.rs), so what the image ships is what the tests check:
#   deploy/image/build.sh OUT_DIR
# builds `flexbridge` with the locked dependencies, strips it into OUT_DIR/usr/local/bin,
# checks that it needs no shared library beyond the runtime image's (glibc, libgcc, OpenSSL)
# and that it runs. FLEXBRIDGE_IMAGE_BINARY=path skips the cargo build and packages that
# binary instead (the test suite passes the one it built, rather than relinking it while
# other tests run it).
set -euo pipefail
out="${1:?usage: deploy/image/build.sh OUT_DIR}"
cd "$(dirname "$0")/../.."

if [ -n "${FLEXBRIDGE_IMAGE_BINARY:-}" ]; then
  target="$FLEXBRIDGE_IMAGE_BINARY"
else
  cargo build --locked --release -p flexbridge
  target="${CARGO_TARGET_DIR:-target}/release/flexbridge"
fi

mkdir -p "$out/usr/local/bin"
strip --strip-unneeded -o "$out/usr/local/bin/flexbridge" "$target"
bin="$out/usr/local/bin/flexbridge"

# The runtime image (distroless cc-debian12) has glibc, libgcc and OpenSSL 3; anything else
# the binary links would fail at start in the container.
allowed='^(linux-vdso|libc|libm|libgcc_s|libssl|libcrypto|libdl|libpthread|librt|ld-linux-x86-64|ld-linux-aarch64)\.so'
unexpected=$(ldd "$bin" | awk '{print $1}' | sed 's#.*/##' | grep -Ev "$allowed" || true)
if [ -n "$unexpected" ]; then
  echo "build.sh: the binary needs libraries the runtime image lacks: $unexpected" >&2
  exit 1
fi

"$bin" --version
echo "build.sh: $bin ($(du -h "$bin" | cut -f1))"
