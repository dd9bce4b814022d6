#!/usr/bin/env bash
# Build the TorchServe frontend plugin that serves the v2 (Open Inference Protocol) REST API:
# /v2, /v2/health/{live,ready}, /v2/models/<name>[/versions/<v>][/ready|/infer] (plugins/v2).
#
# Usage: scripts/build_plugin.sh [--check | --test]
#   --check   exit 0 if this host can build it (a JDK: javac and jar), 1 with the reason if not
#   --test    compile it with its JUnit tests (plugins/v2/src/test) and run them; needs JUnit 5
#             (Debian: junit5, in requirements-debian.txt; or JUNIT_DIR holding its jars)
# Env: B4_PLUGINS_DIR (default $B4_CACHE_DIR/plugins), VENV (the TorchServe whose frontend jar it
#   compiles against), JAVA_HOME.
# Prints the plugins directory (what `torchserve --plugins-path` takes) on stdout. Compiles only
# when the sources or TorchServe changed. Needs a JDK (Debian: openjdk-17-jdk-headless); the
# server itself needs only a JRE.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

check=0
test=0
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --check) check=1 ;;
  --test) test=1 ;;
  "") ;;
  *) die "unknown argument: $1 (see --help)" ;;
esac

bin=""
[ -n "${JAVA_HOME:-}" ] && bin="$JAVA_HOME/bin/"
for tool in javac jar java; do
  if ! command -v "$bin$tool" >/dev/null 2>&1; then
    reason="no $tool: the v2 plugin needs a JDK to build"
    reason+=" (Debian/Ubuntu: apt-get install -y openjdk-17-jdk-headless; or set JAVA_HOME)"
    [ "$check" = 1 ] && { echo "$reason" >&2; exit 1; }
    die "$reason"
  fi
done
[ "$check" = 1 ] && exit 0

frontend=$("$PY" -c 'import pathlib, ts; print(pathlib.Path(ts.__file__).parent / "frontend")')
frontend="$frontend/model-server.jar"
[ -f "$frontend" ] || die "TorchServe's frontend jar is not at $frontend (run scripts/bootstrap.sh)"
sources="$B4_ROOT/plugins/v2/src/main"

if [ "$test" = 1 ]; then
  junit="${JUNIT_DIR:-/usr/share/java}"
  launcher="$junit/junit-platform-console-standalone.jar"
  [ -f "$launcher" ] || die "no JUnit 5 at $junit (Debian: apt-get install -y junit5; or set JUNIT_DIR)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mapfile -t java_files < <(find "$sources/java" "$B4_ROOT/plugins/v2/src/test/java" -name '*.java')
  api="$junit/junit-jupiter-api.jar:$junit/apiguardian-api.jar:$junit/opentest4j.jar"
  "${bin}javac" --release 11 -proc:none -Xlint:all,-processing -Werror -encoding UTF-8 \
    -cp "$frontend:$api" -d "$work" "${java_files[@]}" >&2
  exec "${bin}java" -jar "$launcher" --class-path "$work:$frontend" --select-package b4serve.v2 \
    --disable-banner --disable-ansi-colors --details=tree --fail-if-no-tests
fi
jar_path="$B4_PLUGINS_DIR/b4serve-v2.jar"
# One jar name only: TorchServe loads every jar in the directory and refuses two plugins for /v2.
wanted=$( (cd "$sources" && find . -type f | LC_ALL=C sort | xargs sha256sum
  sha256sum "$frontend") | sha256sum | cut -c1-16)
stamp="$B4_PLUGINS_DIR/.b4serve-v2.sha"
if [ -f "$jar_path" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
  echo "$B4_PLUGINS_DIR"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/classes" "$B4_PLUGINS_DIR"
# Java 11 bytecode: TorchServe 0.12 runs on Java 11 and newer.
mapfile -t java_files < <(find "$sources/java" -name '*.java')
"${bin}javac" --release 11 -proc:none -Xlint:all -Werror -encoding UTF-8 -cp "$frontend" \
  -d "$work/classes" "${java_files[@]}" >&2
cp -r "$sources/resources/." "$work/classes/"
# Appears whole: the partial name does not end in .jar, so no server loads it half-written.
"${bin}jar" --create --file "$jar_path.partial" -C "$work/classes" .
mv "$jar_path.partial" "$jar_path"
echo "$wanted" > "$stamp"
log "built $jar_path"
echo "$B4_PLUGINS_DIR"
