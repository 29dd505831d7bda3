//! Decoding tested for every layout without a live process: threads,
//! frames (with 3.12+ shim frames), lines, locals and cells, GIL holder,
//! thread names from `threading._active`, dicts and instance attributes in
//! each version's representation.

use pymedic_python::fake::{FakeFrame, FakeInterp};
use pymedic_python::layout::{LAYOUTS, Layout};
use pymedic_python::{ProcessMemory, SlotKind};

/// A line table mapping bytecode bytes 0..16 to `first + delta`.
fn table(l: &Layout, delta: u8) -> Vec<u8> {
    match l.version.1 {
        ..=9 => vec![0, delta],
        10 => vec![16, delta],
        _ => vec![0x80 | (13 << 3) | 7, delta * 2],
    }
}

const LOCAL: u8 = 0x20;
const CELL: u8 = 0x40;
const FREE: u8 = 0x80;

#[test]
fn threads_frames_lines_and_locals() {
    for l in LAYOUTS {
        let v = format!("3.{}", l.version.1);
        let mut f = FakeInterp::new(l);
        let g_name = f.str("config");
        let g_val = f.int(-70000);
        let globals = f.dict(&[(g_name, g_val)]);
        let outer = f.code("/app/main.py", "main", 10, &table(l, 2), &[]);
        let inner = f.code(
            "/app/work.py",
            "work",
            20,
            &table(l, 5),
            &[("x", LOCAL), ("shared", CELL), ("up", FREE)],
        );
        let x = f.str("héllo");
        let shared_val = f.int(42);
        let shared = f.cell(shared_val);
        let up_val = f.str("Ω");
        let up = f.cell(up_val);
        let bottom = f.frame(
            &FakeFrame {
                code: outer,
                lasti: 4,
                globals,
                slots: &[],
            },
            0,
        );
        let below = if l.frame.owner_cstack.is_some() {
            f.shim_frame(bottom)
        } else {
            bottom
        };
        let top = f.frame(
            &FakeFrame {
                code: inner,
                lasti: 6,
                globals,
                slots: &[x, shared, up],
            },
            below,
        );
        let t1 = f.thread(0x7000, 101, top);
        let _t2 = f.thread(0x8000, 102, 0);
        f.set_gil_holder(t1);
        let interp = f.interpreter();

        let threads = interp.threads().unwrap();
        assert_eq!(threads.len(), 2, "{v}");
        assert_eq!(threads[0].thread_id, 0x7000, "{v}");
        assert_eq!(threads[1].frame, 0, "{v}");
        if l.thread.native_thread_id.is_some() {
            assert_eq!(threads[0].native_thread_id, Some(101), "{v}");
        }
        assert_eq!(
            interp.gil_holder(threads[0].interp).unwrap(),
            Some(t1),
            "{v}"
        );

        let frames = interp.frames(&threads[0]).unwrap();
        assert_eq!(frames.len(), 2, "{v}: shim frames are skipped");
        assert_eq!(frames[0].code.filename, "/app/work.py");
        assert_eq!(frames[0].code.name, "work");
        assert_eq!(frames[0].line, 25, "{v}");
        assert_eq!(frames[1].line, 12, "{v}");
        assert_eq!(frames[1].code.function(), "main");
        if l.frame.owner_cstack.is_some() {
            assert!(
                frames[0].is_entry,
                "{v}: frame above a shim is an entry frame"
            );
        }

        let slots = interp.frame_slots(&frames[0]).unwrap();
        let kinds: Vec<SlotKind> = slots.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [SlotKind::Local, SlotKind::Cell, SlotKind::Free],
            "{v}"
        );
        assert_eq!(interp.read_str(slots[0].value).unwrap(), "héllo", "{v}");
        assert_eq!(interp.read_int(slots[1].value).unwrap(), Some(42), "{v}");
        assert_eq!(interp.read_str(slots[2].value).unwrap(), "Ω", "{v}");
        assert_eq!(
            interp.lookup_name(&frames[0], "shared").unwrap(),
            Some(shared_val)
        );
        let cfg = interp.lookup_name(&frames[0], "config").unwrap().unwrap();
        assert_eq!(interp.read_int(cfg).unwrap(), Some(-70000), "{v}");
        assert_eq!(interp.lookup_name(&frames[0], "missing").unwrap(), None);
        assert_eq!(interp.repr(cfg, 40), "-70000");
        assert_eq!(interp.repr(slots[0].value, 40), "\"héllo\"");
    }
}

#[test]
fn thread_names_and_instance_attributes() {
    for l in LAYOUTS {
        let v = format!("3.{}", l.version.1);
        let t = &l.type_;
        let mut f = FakeInterp::new(l);
        // A class whose instances keep attributes the way this version does.
        let (flags, dictoffset) = match (t.flag_inline_values, t.flag_managed_dict) {
            (Some(inline), Some(managed)) => (u64::from(inline | managed | t.flag_heaptype), -1),
            (None, Some(managed)) => (u64::from(managed | t.flag_heaptype), -1),
            _ => (u64::from(t.flag_heaptype), 16),
        };
        let basicsize = 16 + if dictoffset > 0 { 8 } else { 0 };
        let cls = f.new_type("Thread", flags, basicsize, dictoffset.max(0));
        // Class attribute via the MRO: Thread.daemon_default = 7.
        let mro = f.tuple(&[cls]);
        f.put_u64(cls + u64::from(t.mro), mro);
        let dd_key = f.str("daemon_default");
        let dd_val = f.int(7);
        let cls_dict = f.dict(&[(dd_key, dd_val)]);
        f.put_u64(cls + u64::from(t.dict), cls_dict);

        let name_key = f.str("_name");
        let ident_key = f.str("_ident");
        let name_val = f.str("worker-1");
        let ident_val = f.int(0x7000);
        let obj = f.object_of(cls, 64);
        let vals = [name_val, ident_val];
        if t.flag_inline_values.is_some() {
            let keys = f.dict_keys(&[(name_key, 0), (ident_key, 0)], true, true);
            f.put_u64(cls + u64::from(t.heap_cached_keys), keys);
            let values_off = l.dict_keys.values_items.unwrap();
            f.put_bytes(obj + basicsize as u64, &[2, 2, 1, 1]);
            for (i, val) in vals.iter().enumerate() {
                f.put_u64(
                    obj + basicsize as u64 + u64::from(values_off) + 8 * i as u64,
                    *val,
                );
            }
        } else if t.flag_managed_dict.is_some() {
            let keys = f.dict_keys(&[(name_key, 0), (ident_key, 0)], true, true);
            f.put_u64(cls + u64::from(t.heap_cached_keys), keys);
            let values = f.dict_values(&vals);
            if t.managed_dict_tagged {
                f.put_u64(obj - u64::from(t.managed_dict_offset.unwrap()), values - 1);
            } else {
                f.put_u64(obj - u64::from(t.managed_values_offset.unwrap()), values);
            }
        } else {
            let d = f.dict(&[(name_key, name_val), (ident_key, ident_val)]);
            f.put_u64(obj + 16, d);
        }
        let ident = f.int(0x7000);
        let active = f.dict(&[(ident, obj)]);
        f.add_module("threading", &[("_active", active)]);
        let interp = f.interpreter();

        assert_eq!(interp.type_name(obj).unwrap(), "Thread");
        let got = interp.getattr(obj, "_name").unwrap().expect(&v);
        assert_eq!(interp.read_str(got).unwrap(), "worker-1", "{v}");
        let dd = interp.getattr(obj, "daemon_default").unwrap().expect(&v);
        assert_eq!(interp.read_int(dd).unwrap(), Some(7), "{v}");
        assert!(interp.getattr(obj, "nope").unwrap().is_none());
        let names = interp.thread_names(f.interp).unwrap();
        assert_eq!(
            names.get(&0x7000).map(String::as_str),
            Some("worker-1"),
            "{v}"
        );
        // The fake memory is readable like any other source.
        assert!(interp.memory().read_u64(f.runtime).is_ok());
    }
}

#[test]
fn newest_dict_entries_and_list_items() {
    for l in LAYOUTS {
        let v = format!("3.{}", l.version.1);
        let mut f = FakeInterp::new(l);
        let entries: Vec<(u64, u64)> = (0..40)
            .map(|i| {
                let k = f.str(&format!("k{i}"));
                let val = f.int(i);
                (k, val)
            })
            .collect();
        let d = f.dict(&entries);
        let items: Vec<u64> = (0..9).map(|i| f.int(100 + i)).collect();
        let lst = f.object("list", (l.list.items + 8) as usize);
        let arr = f.alloc(8 * items.len());
        for (i, it) in items.iter().enumerate() {
            f.put_u64(arr + 8 * i as u64, *it);
        }
        f.put_u64(lst + u64::from(l.list.size), items.len() as u64);
        f.put_u64(lst + u64::from(l.list.items), arr);
        let interp = f.interpreter();
        let tail = interp.dict_last_entries(d, 3).unwrap();
        assert_eq!(tail, entries[37..].to_vec(), "{v}");
        assert_eq!(interp.dict_last_entries(d, 100).unwrap().len(), 40, "{v}");
        assert_eq!(interp.dict_entries(d, 1000).unwrap(), entries, "{v}");
        assert_eq!(interp.list_last_items(lst, 2).unwrap(), items[7..].to_vec());
        assert_eq!(interp.list_last_items(lst, 50).unwrap(), items);
    }
}
