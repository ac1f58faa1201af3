//! dpkg and rpm version ordering and the package grammar checks. The input is up
//! to three versions, one per line; both orderings must be total orders over them
//! (reflexive, antisymmetric, transitive), and the validators must not panic.
use std::cmp::Ordering;

use patchbook::primitives::version::{
    check_deb_package, check_deb_version, check_rpm_name, check_rpm_version, dpkg_cmp, rpm_cmp,
    rpmvercmp,
};

fn total_order(name: &str, cmp: fn(&str, &str) -> Ordering, v: &[&str]) {
    for a in v {
        assert_eq!(
            cmp(a, a),
            Ordering::Equal,
            "{name}: {a:?} is not equal to itself"
        );
        for b in v {
            assert_eq!(
                cmp(a, b),
                cmp(b, a).reverse(),
                "{name}: {a:?} vs {b:?} is not antisymmetric"
            );
            for c in v {
                if cmp(a, b) != Ordering::Greater && cmp(b, c) != Ordering::Greater {
                    assert_ne!(
                        cmp(a, c),
                        Ordering::Greater,
                        "{name}: {a:?} <= {b:?} <= {c:?} but {a:?} > {c:?}"
                    );
                }
            }
        }
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some(text) = patchbook_fuzz::text(data) else {
            return;
        };
        let v: Vec<&str> = text.splitn(3, '\n').collect();
        total_order("dpkg", dpkg_cmp, &v);
        total_order("rpm", rpm_cmp, &v);
        total_order("rpmvercmp", rpmvercmp, &v);
        for s in &v {
            let _ = check_deb_version(s);
            let _ = check_deb_package(s);
            let _ = check_rpm_version(s);
            let _ = check_rpm_name(s);
        }
    });
}
