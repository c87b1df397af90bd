//! virtio-balloon with Linux's driver: a partition in a `[pool]` (only those have a
//! balloon) boots Linux, whose virtio_balloon driver binds to the device; `amsvm loan`
//! holds a 64 MiB target, the guest's free memory drops by it and amsvm's loan reaches
//! it; `amsvm loan … 0` gives it back.
//!
//! The guest prints its MemFree and MemAvailable about every second (amsvm offers
//! VIRTIO_BALLOON_F_DEFLATE_ON_OOM, with which Linux leaves MemTotal alone) until L1
//! writes a stop mark on a small control disk that the guest reads with O_DIRECT.

use std::time::Duration;

use serde_json::Value;

use crate::boot::summary_row;
use crate::harness::*;

const LOAN_MIB: u64 = 64;

/// `MemFree` and `MemAvailable` (KiB) from a guest line
/// `amsvm-guest: mem MemFree: N kB MemAvailable: M kB`.
fn meminfo(line: &str) -> Option<(u64, u64)> {
    let f: Vec<&str> = line.strip_prefix("amsvm-guest: mem ")?.split_whitespace().collect();
    let get = |k: &str| f.iter().position(|w| *w == k).and_then(|i| f.get(i + 1)).and_then(|v| v.parse().ok());
    Some((get("MemFree:")?, get("MemAvailable:")?))
}

#[test]
fn linux_balloon_driver_follows_amsvm_loan_and_gives_it_back() {
    let guest_cmd = "i=0; while [ $i -lt 120 ] && ! dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | grep -q amsvm-stop; \
                     do echo amsvm-guest: mem $(grep -E '^(MemFree|MemAvailable):' /proc/meminfo); sleep 1; i=$((i+1)); done";
    let cmdline = l2_cmdline(guest_cmd);
    assert!(!cmdline.contains("'''"));
    let toml = format!(
        "log_dir = \"/tmp/logs\"\n[pool]\nsize_mib = 512\npaging_dir = \"/tmp/paging\"\n\
         [[partition]]\nname = \"lin\"\nlogical_mib = 256\nvcpus = 2\nkernel = \"/l2/vmlinuz\"\n\
         initrd = \"/l2/initramfs.cpio.gz\"\ncmdline = '''{cmdline}'''\nconsole_stdout = true\n\
         [[partition.disk]]\npath = \"/tmp/ctl.img\"\ncreate_mib = 1\n"
    );
    let pages = LOAN_MIB * 256;
    let script = format!(
        r#"
say "amsvm start balloon"
timeout 100 amsvm run /scenario/balloon.toml --socket $SOCK &
apid=$!
stat_until 60 '"active":true' "the guest's virtio_balloon driver starts the device" &&
    stat_until 30 '"stats_updates":[1-9]' "the guest reports balloon statistics" &&
    sleep 3 &&
    say "loan {LOAN_MIB}: $(amsvm loan lin {LOAN_MIB} --socket $SOCK 2>&1 && echo set)" &&
    stat_until 60 '"loan_pages":{pages},' "amsvm's loan reaching the {LOAN_MIB} MiB target" &&
    stat_until 30 '"actual":{pages},' "the driver's actual reaching the loan (it writes it after its last inflate batch)" &&
    say "loaned" &&
    sleep 4 &&
    say "loan 0: $(amsvm loan lin 0 --socket $SOCK 2>&1 && echo set)" &&
    stat_until 60 '"loan_pages":0,' "the loan given back" &&
    say "given back" &&
    sleep 4
say "stopping the guest"
printf amsvm-stop | dd of=/tmp/ctl.img conv=notrunc 2>/dev/null
wait $apid
say "amsvm run exit status $?"
"#
    );
    let run = run(Scenario {
        name: "balloon",
        script,
        files: vec![File::text("balloon.toml", &toml)],
        timeout: Duration::from_secs(120),
    });
    run.check_l1().unwrap_or_else(|e| panic!("{e}"));
    let fail = |why: &str| -> ! { panic!("{}", run.failure(why)) };
    if let Some(l) = run.find("amsvm-l1: FAIL:") {
        fail(&l.text);
    }
    let g: Vec<(f64, &str)> = run.guest("lin").collect();
    if !g.iter().any(|(_, l)| l.contains(" device 0x0005 ") && l.contains("driver virtio_balloon")) {
        fail("Linux's virtio_balloon driver did not bind to the balloon (no virtio device 0x0005 with driver virtio_balloon)");
    }
    // The snapshots L1 printed at each step.
    let snapshot = |after: &str| -> Value {
        let i = run.lines.iter().position(|l| l.text.starts_with(after)).unwrap_or_else(|| fail(&format!("no \"{after}\" line")));
        let l = run.lines[..i].iter().rev().find(|l| l.text.starts_with("amsvm-l1: stat ")).unwrap();
        let v: Value = serde_json::from_str(&l.text["amsvm-l1: stat ".len()..])
            .unwrap_or_else(|e| fail(&format!("amsvm stat --json printed something that is not JSON ({e}): {}", l.text)));
        v["partitions"][0].clone()
    };
    let loaned = snapshot("amsvm-l1: loaned");
    let b = &loaned["balloon"];
    let (lp, lt) = (loaned["loan_pages"].as_u64(), loaned["loan_target_pages"].as_u64());
    if lp != Some(pages) || lt != Some(pages) || b["loaned"].as_u64() != Some(pages) || b["actual"].as_u64() != Some(pages) {
        fail(&format!(
            "while loaned: loan_pages {lp:?}, loan_target_pages {lt:?}, balloon.loaned {}, balloon.actual {} (want {pages} each)",
            b["loaned"], b["actual"]
        ));
    }
    if b["rejected"].as_u64() != Some(0) {
        fail(&format!("the balloon rejected {} requests of Linux's driver", b["rejected"]));
    }
    for key in ["free", "total", "available"] {
        if b["guest_stats"][key].as_u64().unwrap_or(0) == 0 {
            fail(&format!("the guest's balloon statistics lack \"{key}\": {}", b["guest_stats"]));
        }
    }
    let back = snapshot("amsvm-l1: given back");
    if back["balloon"]["loaned"].as_u64() != Some(0) || back["balloon"]["deflated"].as_u64() < Some(pages) {
        fail(&format!("after `amsvm loan lin 0`: balloon {}", back["balloon"]));
    }
    // The guest's view: the highest free memory before the loan, while it was held, and
    // after it was given back (free page reporting dips it for moments; maxima ignore that).
    let t = |needle: &str| run.at(needle).unwrap_or_else(|| fail(&format!("no \"{needle}\" line")));
    let (t_set, t_loaned, t_zero, t_back, t_stop) = (
        t("amsvm-l1: loan 64:"),
        t("amsvm-l1: loaned"),
        t("amsvm-l1: loan 0:"),
        t("amsvm-l1: given back"),
        t("amsvm-l1: stopping the guest"),
    );
    let max_in = |from: f64, to: f64| -> Option<(u64, u64)> {
        let v: Vec<(u64, u64)> = g.iter().filter(|(t, _)| *t > from && *t < to).filter_map(|(_, l)| meminfo(l)).collect();
        Some((v.iter().map(|m| m.0).max()?, v.iter().map(|m| m.1).max()?))
    };
    let before = max_in(0.0, t_set).unwrap_or_else(|| fail("no guest meminfo line before the loan"));
    let during = max_in(t_loaned, t_zero).unwrap_or_else(|| fail("no guest meminfo line while the loan was held"));
    let after = max_in(t_back, t_stop).unwrap_or_else(|| fail("no guest meminfo line after the loan was given back"));
    let loan_kib = LOAN_MIB * 1024;
    let summary = format!(
        "guest MemFree/MemAvailable KiB: before {before:?}, loaned {during:?}, given back {after:?}; loan {loan_kib} KiB"
    );
    if during.0 + loan_kib * 3 / 4 > before.0 || during.1 + loan_kib * 3 / 4 > before.1 {
        fail(&format!("the guest's free memory did not drop by the loan: {summary}"));
    }
    if after.0 + 16 * 1024 < before.0 || after.1 + 16 * 1024 < before.1 {
        fail(&format!("the guest did not get its memory back: {summary}"));
    }
    let row = summary_row(&run, "lin").unwrap_or_else(|| fail("amsvm printed no summary row"));
    let f: Vec<&str> = row.split_whitespace().collect();
    if f.get(11) != Some(&pages.to_string().as_str()) || !row.ends_with("powered off") {
        fail(&format!("summary row: peak-loan should be {pages} and the outcome \"powered off\": {row}"));
    }
    if run.l1_value("amsvm run exit status") != Some("0") {
        fail("amsvm run did not exit with status 0");
    }
    report(&format!("[nested balloon] {summary}"));
    let mut phases = run.l1_phases();
    phases.push(("amsvm start", run.at("amsvm-l1: amsvm start balloon")));
    phases.push(("L2 /init", run.at("[lin] amsvm-guest: kernel")));
    phases.push(("driver active", run.at("amsvm-l1: stat ")));
    phases.push(("loan set", Some(t_set)));
    phases.push(("loan reached", Some(t_loaned)));
    phases.push(("loan 0", Some(t_zero)));
    phases.push(("given back", Some(t_back)));
    phases.push(("amsvm exit", run.at("amsvm-l1: amsvm run exit status")));
    run.timings(&phases);
}
