#!/usr/bin/env bash
# Fuzz amsvm's guest- and file-facing code with libFuzzer on the stable toolchain.
#
#   fuzz/fuzz.sh [SECONDS] [TARGET...]     (default: 600 s each, every target)
#
# Builds the targets with coverage instrumentation (the -C flags cargo-fuzz passes;
# no sanitizer, so no nightly), runs each for SECONDS on its corpus (fuzz/corpus/T, new
# inputs are added there, then the corpus is merged down to the inputs that add
# coverage), and prints executions, coverage and crashes per target.
# Crashing inputs go to fuzz/artifacts/T/. Set JOBS=2 to run two targets at once.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${1:-600}
shift || true
ALL=(virtio_blk virtio_balloon vasi_device virtio_mmio vasi_records paging_device elf_image linux_kernel config)
[ $# -gt 0 ] && TARGETS=("$@") || TARGETS=("${ALL[@]}")
TRIPLE=x86_64-unknown-linux-gnu
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
echo "building ${#TARGETS[@]} target(s) with coverage instrumentation ..." >&2
cargo build --release --target "$TRIPLE" $(printf -- '--bin %s ' "${TARGETS[@]}") >&2
LOGS=$(mktemp -d)
run() {
    local t=$1
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "fuzzing $t for ${SECONDS_EACH}s ..." >&2
    set +e
    # Images are larger than driver sessions and records.
    local max_len=4096
    case $t in elf_image|linux_kernel) max_len=131072 ;; esac
    "target/$TRIPLE/release/$t" "corpus/$t" -max_total_time="$SECONDS_EACH" -print_final_stats=1 \
        -max_len=$max_len -rss_limit_mb=2048 -artifact_prefix="artifacts/$t/" > "$LOGS/$t.log" 2>&1
    echo $? > "$LOGS/$t.rc"
    # Keep the corpus small: only inputs that add coverage stay (libFuzzer's merge).
    local min="$LOGS/$t.min"
    mkdir -p "$min"
    if "target/$TRIPLE/release/$t" -merge=1 -max_len=$max_len "$min" "corpus/$t" > "$LOGS/$t.merge.log" 2>&1; then
        rm -rf "corpus/$t" && mv "$min" "corpus/$t"
    fi
    set -e
}
JOBS=${JOBS:-1}
for t in "${TARGETS[@]}"; do
    run "$t" &
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
done
wait
printf '\n%-16s %8s %14s %10s %8s %8s %8s  %s\n' target seconds executions "exec/s" cov ft corpus crashes
fail=0
for t in "${TARGETS[@]}"; do
    log="$LOGS/$t.log"
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    cov=$(echo "$last" | grep -o 'cov: [0-9]*' | grep -o '[0-9]*' || echo -)
    ft=$(echo "$last" | grep -o 'ft: [0-9]*' | grep -o '[0-9]*' || echo -)
    corpus=$(ls "corpus/$t" | wc -l)
    crashes=$(ls "artifacts/$t" 2>/dev/null | wc -l)
    printf '%-16s %8s %14s %10s %8s %8s %8s  %s\n' "$t" "$SECONDS_EACH" "$execs" "$rate" "$cov" "$ft" "$corpus" "$crashes"
    if [ "$(cat "$LOGS/$t.rc")" != 0 ] || [ "$crashes" != 0 ]; then
        fail=1
        echo "  $t: libFuzzer exit $(cat "$LOGS/$t.rc"); last lines:" >&2
        tail -20 "$log" | sed 's/^/    /' >&2
    fi
done
rm -rf "$LOGS"
exit $fail
