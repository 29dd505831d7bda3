//! The lock-order graph: an edge A → B says a thread acquired (or waited
//! for) B while holding A, with where each was taken. A cycle whose edges
//! come from two or more threads is a deadlock that has not happened yet.
//! Pure: the `lock_order_inversion` detector feeds it observations.
//!
//! * Nodes are lock identities (object address + generation): when the
//!   same address turns out to hold a different lock (its semaphore moved,
//!   or the semaphore was initialised again: a new allocation), the old
//!   generation's edges are dropped, so a freed and reused address never
//!   makes a false edge.
//! * An edge remembers the locks its thread held *before* the outer one
//!   (gate locks); a cycle whose every edge was taken under one common gate
//!   lock cannot deadlock (the gate serialises it) and is not reported.
//! * Re-entering a lock already held (an `RLock`) is not an edge.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use pymedic_model::Location;

/// Threads remembered per edge.
pub const MAX_EDGE_THREADS: usize = 16;

/// A lock identity within one process.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    /// The lock object's address.
    pub id: String,
    pub generation: u32,
}

/// One lock of a thread's acquisition sequence, outermost first.
#[derive(Clone, Debug)]
pub struct Acquired {
    /// Object address.
    pub id: String,
    /// Address of its semaphore (may change when the address is reused).
    pub futex: u64,
    /// How many times that semaphore was initialised (`sem_init`): a new
    /// lock at a reused address has a new count. 0 when not counted.
    pub alloc: u32,
    /// The expression it was reached by (`self._lock`).
    pub name: String,
    /// Where it was taken (or, for the last, is being waited for).
    pub at: Location,
}

/// What one observation of a thread says.
#[derive(Clone, Debug)]
pub struct Observation {
    pub tid: u32,
    pub thread: String,
    /// Locks held, outermost first, then possibly the one it waits for.
    pub sequence: Vec<Acquired>,
    /// The last of `sequence` is awaited, not held.
    pub waiting: bool,
    /// Python stack, innermost first.
    pub stack: Vec<Location>,
}

/// One edge of the graph.
#[derive(Clone, Debug)]
pub struct Edge {
    pub outer: Node,
    pub inner: Node,
    pub outer_name: String,
    pub inner_name: String,
    pub outer_at: Location,
    pub inner_at: Location,
    pub tid: u32,
    pub thread: String,
    pub stack: Vec<Location>,
    /// Every thread seen taking this edge (tid → name; at most
    /// [`MAX_EDGE_THREADS`]).
    pub threads: BTreeMap<u32, String>,
    /// The inner lock was being waited for (contended) when seen.
    pub waited: bool,
    pub seen: u64,
    /// Locks held before `outer` every time this edge was seen.
    pub gates: BTreeSet<Node>,
}

/// A cycle: each edge's inner lock is the next edge's outer lock.
#[derive(Clone, Debug)]
pub struct Cycle {
    pub edges: Vec<Edge>,
}

impl Cycle {
    /// Order-independent identity (the set of nodes).
    pub fn key(&self) -> Vec<Node> {
        let mut k: Vec<Node> = self.edges.iter().map(|e| e.outer.clone()).collect();
        k.sort();
        k
    }
}

/// The graph of one process.
#[derive(Default)]
pub struct LockGraph {
    /// Object address → ((semaphore address, its allocation count), generation).
    generations: HashMap<String, ((u64, u32), u32)>,
    edges: HashMap<(Node, Node), Edge>,
    /// Bound on edges kept (oldest-seen dropped first beyond it).
    pub max_edges: usize,
}

impl LockGraph {
    pub fn new(max_edges: usize) -> LockGraph {
        LockGraph {
            max_edges,
            ..LockGraph::default()
        }
    }

    pub fn edge_count(&self) -> usize {
        self.edges.len()
    }

    /// The node for a lock, starting a new generation when its address now
    /// holds a different semaphore, or a re-initialised one.
    fn node(&mut self, id: &str, futex: u64, alloc: u32) -> Node {
        let sem = (futex, alloc);
        let entry = self.generations.entry(id.to_owned()).or_insert((sem, 0));
        if entry.0 != sem {
            let old = Node {
                id: id.to_owned(),
                generation: entry.1,
            };
            *entry = (sem, entry.1 + 1);
            self.edges.retain(|(a, b), _| *a != old && *b != old);
        }
        Node {
            id: id.to_owned(),
            generation: entry.1,
        }
    }

    /// Adds what one thread was seen holding (and waiting for).
    pub fn observe(&mut self, o: &Observation) {
        let mut nodes: Vec<(Node, &Acquired)> = Vec::new();
        for a in &o.sequence {
            let n = self.node(&a.id, a.futex, a.alloc);
            // Re-entry (an RLock taken again) is not an edge.
            if nodes.iter().any(|(m, _)| *m == n) {
                continue;
            }
            nodes.push((n, a));
        }
        let last = nodes.len().saturating_sub(1);
        for i in 0..nodes.len() {
            for j in i + 1..nodes.len() {
                let (outer, oa) = &nodes[i];
                let (inner, ia) = &nodes[j];
                let gates: BTreeSet<Node> = nodes[..i].iter().map(|(n, _)| n.clone()).collect();
                let waited = o.waiting && j == last;
                let e = self
                    .edges
                    .entry((outer.clone(), inner.clone()))
                    .or_insert_with(|| Edge {
                        outer: outer.clone(),
                        inner: inner.clone(),
                        outer_name: oa.name.clone(),
                        inner_name: ia.name.clone(),
                        outer_at: oa.at.clone(),
                        inner_at: ia.at.clone(),
                        tid: o.tid,
                        thread: o.thread.clone(),
                        stack: o.stack.clone(),
                        threads: BTreeMap::new(),
                        waited,
                        seen: 0,
                        gates: gates.clone(),
                    });
                e.seen += 1;
                if e.threads.len() < MAX_EDGE_THREADS || e.threads.contains_key(&o.tid) {
                    e.threads.insert(o.tid, o.thread.clone());
                }
                e.waited |= waited;
                e.gates = e.gates.intersection(&gates).cloned().collect();
            }
        }
        if self.max_edges > 0 && self.edges.len() > self.max_edges {
            let mut by_seen: Vec<((Node, Node), u64)> = self
                .edges
                .iter()
                .map(|(k, e)| (k.clone(), e.seen))
                .collect();
            by_seen.sort_by_key(|(_, s)| *s);
            for (k, _) in by_seen.into_iter().take(self.edges.len() - self.max_edges) {
                self.edges.remove(&k);
            }
        }
    }

    /// Every cycle (one per set of locks, shortest path first) whose edges
    /// come from at least two threads and share no gate lock.
    pub fn cycles(&self) -> Vec<Cycle> {
        let mut adj: HashMap<&Node, Vec<&Edge>> = HashMap::new();
        for e in self.edges.values() {
            adj.entry(&e.outer).or_default().push(e);
        }
        for v in adj.values_mut() {
            v.sort_by(|a, b| a.inner.cmp(&b.inner));
        }
        let mut seen: HashSet<Vec<Node>> = HashSet::new();
        let mut out = Vec::new();
        let mut starts: Vec<&Edge> = self.edges.values().collect();
        starts.sort_by(|a, b| (&a.outer, &a.inner).cmp(&(&b.outer, &b.inner)));
        for first in starts {
            let Some(path) = shortest_path(&adj, &first.inner, &first.outer) else {
                continue;
            };
            let mut edges = vec![first.clone()];
            edges.extend(path.into_iter().cloned());
            // Two or more threads between them (one thread taking locks in
            // both orders cannot deadlock with itself).
            let threads: HashSet<u32> = edges
                .iter()
                .flat_map(|e| e.threads.keys().copied())
                .collect();
            if threads.len() < 2 {
                continue;
            }
            attribute(&mut edges);
            let cycle = Cycle { edges };
            let mut common = cycle.edges[0].gates.clone();
            for e in &cycle.edges[1..] {
                common = common.intersection(&e.gates).cloned().collect();
            }
            if !common.is_empty() {
                continue;
            }
            if seen.insert(cycle.key()) {
                out.push(cycle);
            }
        }
        out
    }
}

/// Names, for each edge of a cycle, a thread that took it, each different
/// from the previous edge's when the edge has another.
fn attribute(edges: &mut [Edge]) {
    let mut prev: Option<u32> = None;
    for i in 0..edges.len() {
        let next: Option<Vec<u32>> = edges
            .get(i + 1)
            .map(|e| e.threads.keys().copied().collect());
        let e = &mut edges[i];
        let pick = e
            .threads
            .keys()
            .copied()
            .filter(|t| Some(*t) != prev)
            // Prefer a thread the next edge cannot use as its own.
            .max_by_key(|t| next.as_ref().is_some_and(|n| n.len() > 1 || !n.contains(t)))
            .unwrap_or(e.tid);
        if let Some(name) = e.threads.get(&pick) {
            e.thread = name.clone();
            e.tid = pick;
        }
        prev = Some(e.tid);
    }
}

/// Edges of a shortest path from `from` to `to` (breadth first).
fn shortest_path<'a>(
    adj: &HashMap<&Node, Vec<&'a Edge>>,
    from: &Node,
    to: &Node,
) -> Option<Vec<&'a Edge>> {
    let mut prev: HashMap<&Node, &'a Edge> = HashMap::new();
    let mut queue: VecDeque<&Node> = VecDeque::from([from]);
    let mut visited: HashSet<&Node> = HashSet::from([from]);
    while let Some(n) = queue.pop_front() {
        if n == to {
            let mut path = Vec::new();
            let mut cur = to;
            while cur != from {
                let e = prev[cur];
                path.push(e);
                cur = &e.outer;
            }
            path.reverse();
            return Some(path);
        }
        for e in adj.get(n).into_iter().flatten() {
            if visited.insert(&e.inner) {
                prev.insert(&e.inner, e);
                queue.push_back(&e.inner);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acq(id: &str, futex: u64, line: u32) -> Acquired {
        Acquired {
            id: id.into(),
            futex,
            alloc: 0,
            name: format!("lock_{id}"),
            at: Location::new("app.py", "f", line),
        }
    }

    fn obs(tid: u32, seq: Vec<Acquired>, waiting: bool) -> Observation {
        Observation {
            tid,
            thread: format!("t{tid}"),
            sequence: seq,
            waiting,
            stack: vec![],
        }
    }

    #[test]
    fn two_threads_in_opposite_order_make_a_cycle_with_every_site() {
        let mut g = LockGraph::new(1000);
        g.observe(&obs(1, vec![acq("a", 10, 5), acq("b", 20, 6)], false));
        assert!(g.cycles().is_empty());
        g.observe(&obs(2, vec![acq("b", 20, 15), acq("a", 10, 16)], true));
        let c = g.cycles();
        assert_eq!(c.len(), 1);
        let e = &c[0].edges;
        assert_eq!(e.len(), 2);
        let ab = e.iter().find(|e| e.outer.id == "a").unwrap();
        assert_eq!((ab.outer_at.line, ab.inner_at.line), (5, 6));
        let ba = e.iter().find(|e| e.outer.id == "b").unwrap();
        assert_eq!((ba.outer_at.line, ba.inner_at.line), (15, 16));
        assert!(ba.waited && !ab.waited);
    }

    #[test]
    fn consistent_order_and_one_thread_are_not_inversions() {
        let mut g = LockGraph::new(1000);
        for t in 1..5 {
            g.observe(&obs(t, vec![acq("a", 10, 5), acq("b", 20, 6)], t % 2 == 0));
        }
        assert!(g.cycles().is_empty());
        // One thread in both orders cannot deadlock with itself.
        g.observe(&obs(9, vec![acq("b", 20, 30), acq("a", 10, 31)], false));
        g.observe(&obs(9, vec![acq("a", 10, 32), acq("b", 20, 33)], false));
        let c = g.cycles();
        assert_eq!(c.len(), 1, "thread 9's b->a with the others' a->b");
        let mut h = LockGraph::new(1000);
        h.observe(&obs(9, vec![acq("b", 20, 30), acq("a", 10, 31)], false));
        h.observe(&obs(9, vec![acq("a", 10, 32), acq("b", 20, 33)], false));
        assert!(h.cycles().is_empty());
    }

    #[test]
    fn an_edge_seen_by_several_threads_can_pair_with_any_of_them() {
        let mut g = LockGraph::new(1000);
        // Thread 1 takes a->b and b->a itself (no deadlock on its own)...
        g.observe(&obs(1, vec![acq("a", 10, 5), acq("b", 20, 6)], false));
        g.observe(&obs(1, vec![acq("b", 20, 15), acq("a", 10, 16)], false));
        assert!(g.cycles().is_empty());
        // ...then thread 2 takes b->a too: it can deadlock with thread 1.
        g.observe(&obs(2, vec![acq("b", 20, 15), acq("a", 10, 16)], false));
        let c = g.cycles();
        assert_eq!(c.len(), 1);
        let tids: HashSet<u32> = c[0].edges.iter().map(|e| e.tid).collect();
        assert_eq!(tids, HashSet::from([1, 2]), "{:?}", c[0]);
    }

    #[test]
    fn rlock_reentry_is_not_an_edge() {
        let mut g = LockGraph::new(1000);
        g.observe(&obs(1, vec![acq("r", 10, 5), acq("r", 10, 9)], false));
        assert_eq!(g.edge_count(), 0);
    }

    #[test]
    fn a_reused_address_starts_a_new_lock() {
        let mut g = LockGraph::new(1000);
        g.observe(&obs(1, vec![acq("a", 10, 5), acq("b", 20, 6)], false));
        // "a" was freed; its address now holds another lock (new semaphore).
        g.observe(&obs(2, vec![acq("b", 20, 15), acq("a", 11, 16)], false));
        assert!(g.cycles().is_empty());
    }

    #[test]
    fn a_reused_address_and_semaphore_with_a_new_allocation_is_a_new_lock() {
        let mut g = LockGraph::new(1000);
        let mut a = acq("a", 10, 5);
        a.alloc = 1;
        g.observe(&obs(1, vec![a.clone(), acq("b", 20, 6)], false));
        // Same object and semaphore addresses, initialised again.
        a.alloc = 2;
        g.observe(&obs(2, vec![acq("b", 20, 15), a.clone()], false));
        assert!(g.cycles().is_empty());
        // The same allocation seen again is the same lock.
        g.observe(&obs(3, vec![a, acq("b", 20, 6)], false));
        assert_eq!(g.cycles().len(), 1);
    }

    #[test]
    fn a_common_gate_lock_prevents_the_deadlock() {
        let mut g = LockGraph::new(1000);
        g.observe(&obs(
            1,
            vec![acq("g", 1, 1), acq("a", 10, 5), acq("b", 20, 6)],
            false,
        ));
        g.observe(&obs(
            2,
            vec![acq("g", 1, 2), acq("b", 20, 15), acq("a", 10, 16)],
            false,
        ));
        assert!(g.cycles().is_empty());
    }

    #[test]
    fn three_lock_cycle() {
        let mut g = LockGraph::new(1000);
        g.observe(&obs(1, vec![acq("a", 1, 1), acq("b", 2, 2)], false));
        g.observe(&obs(2, vec![acq("b", 2, 3), acq("c", 3, 4)], false));
        g.observe(&obs(3, vec![acq("c", 3, 5), acq("a", 1, 6)], false));
        let c = g.cycles();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].edges.len(), 3);
    }
}
