//! The backup checks `restore` relies on. An input starting with `{` is a backup
//! manifest (the recorded handle): it must read back as it was written. Anything
//! else is a tar archive checked against the roots `etc/acme` and `opt/acme`:
//! checking never panics, the archive rebuilt from the checked entries passes the
//! same check, and rebuilding that again gives the same bytes (nothing the check
//! did not see survives a rebuild).
use patchbook::primitives::backup::{check_archive, rebuild_archive, BackupHandle};

fn main() {
    let roots = vec!["etc/acme".to_string(), "opt/acme".to_string()];
    afl::fuzz!(|data: &[u8]| {
        if data.first() == Some(&b'{') {
            if let Ok(handle) = serde_json::from_slice::<BackupHandle>(data) {
                let again: BackupHandle =
                    serde_json::from_str(&serde_json::to_string(&handle).unwrap()).unwrap();
                assert_eq!(again, handle);
                let _ = handle.as_ref_for_undo();
            }
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("b.tar");
        std::fs::write(&archive, data).unwrap();
        let checked = check_archive(&archive, &roots);
        let once = dir.path().join("once.tar");
        let rebuilt = rebuild_archive(&archive, &roots, &once);
        assert_eq!(
            checked.is_ok(),
            rebuilt.is_ok(),
            "check and rebuild disagree: {checked:?} vs {rebuilt:?}"
        );
        if rebuilt.is_ok() {
            check_archive(&once, &roots).expect("a rebuilt archive passes the check");
            let twice = dir.path().join("twice.tar");
            rebuild_archive(&once, &roots, &twice).expect("a rebuilt archive rebuilds");
            assert_eq!(
                std::fs::read(&once).unwrap(),
                std::fs::read(&twice).unwrap(),
                "rebuilding a rebuilt archive changed it"
            );
        }
    });
}
