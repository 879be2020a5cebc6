//! How a scrape's samples are laid out: built once with their labels (`Build`), then, while
//! the services, backends and optional series stay the same, only refilled (`Fill`).

use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};

use super::families::FAMILIES;

/// One family: samples in the order the walk adds them.
pub(super) struct Family {
    pub(super) mf: MetricFamily,
    pub(super) kind: MetricType,
    pub(super) labels: &'static [&'static str],
    /// The walk's n-th sample is `mf`'s metric `order[n]` (the registry sorts by label values).
    pub(super) order: Vec<u32>,
    /// `mf` is out with the registry (see `restore`).
    pub(super) lent: bool,
}

impl Family {
    pub(super) fn new(
        &(name, help, kind, labels): &(&'static str, &'static str, MetricType, &'static [&'static str]),
    ) -> Self {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(kind);
        Self {
            mf,
            kind,
            labels,
            order: Vec::new(),
            lent: false,
        }
    }

    /// Sorts the samples as the registry's `gather` does (by label values, stably), so its sort
    /// leaves them where they are, and records where each of the walk's samples went.
    pub(super) fn sort(&mut self) {
        let metrics = self.mf.mut_metric();
        let mut idx: Vec<u32> = (0..metrics.len() as u32).collect();
        let values = |m: &Metric| {
            m.get_label()
                .iter()
                .map(|l| l.value().to_string())
                .collect::<Vec<_>>()
        };
        let keys: Vec<Vec<String>> = metrics.iter().map(values).collect();
        idx.sort_by(|&a, &b| keys[a as usize].cmp(&keys[b as usize]));
        let mut taken: Vec<Option<Metric>> = std::mem::take(metrics).into_iter().map(Some).collect();
        self.order = vec![0; idx.len()];
        for (pos, &i) in idx.iter().enumerate() {
            self.order[i as usize] = pos as u32;
            if let Some(m) = taken[i as usize].take() {
                metrics.push(m);
            }
        }
    }

    fn push(&mut self, values: &[&str], v: f64) {
        let labels = self
            .labels
            .iter()
            .zip(values)
            .map(|(n, v)| {
                let mut l = LabelPair::default();
                l.set_name(n.to_string());
                l.set_value(v.to_string());
                l
            })
            .collect();
        let mut m = Metric::from_label(labels);
        set_value(&mut m, self.kind, v);
        self.mf.mut_metric().push(m);
    }
}

fn set_value(m: &mut Metric, kind: MetricType, v: f64) {
    if kind == MetricType::COUNTER {
        let mut c = proto::Counter::default();
        c.set_value(v);
        m.set_counter(c);
    } else {
        let mut g = proto::Gauge::default();
        g.set_value(v);
        m.set_gauge(g);
    }
}

/// Where the walk puts samples: a new layout (labels built) or the cached one (values only).
pub(super) trait Sink {
    fn add(&mut self, family: usize, labels: &[&str], v: f64);
    /// What the labels that follow depend on (a name, which optional series exist): the
    /// layout's shape. A cached layout fits only a walk with the same shape.
    fn shape(&mut self, part: &[u8]);
}

/// Builds every sample, labels included: when the shape changes.
pub(super) struct Build {
    pub(super) families: Vec<Family>,
    pub(super) shape: Vec<u8>,
}

impl Sink for Build {
    fn add(&mut self, family: usize, labels: &[&str], v: f64) {
        self.families[family].push(labels, v);
    }
    fn shape(&mut self, part: &[u8]) {
        self.shape.extend_from_slice(part);
    }
}

/// Writes values into a cached layout, in the walk's order; `fits` turns false when the walk
/// does not match the layout (the cache is then rebuilt).
pub(super) struct Fill<'a> {
    pub(super) families: &'a mut [Family],
    expected: &'a [u8],
    cursor: [usize; FAMILIES.len()],
    pub(super) shape: usize,
    fits: bool,
}

impl Sink for Fill<'_> {
    fn add(&mut self, family: usize, _labels: &[&str], v: f64) {
        let f = &mut self.families[family];
        let i = self.cursor[family];
        let at = f.order.get(i).map_or(usize::MAX, |&p| p as usize);
        match f.mf.mut_metric().get_mut(at) {
            Some(m) => set_value(m, f.kind, v),
            None => self.fits = false,
        }
        self.cursor[family] = i + 1;
    }
    fn shape(&mut self, part: &[u8]) {
        let end = self.shape + part.len();
        if self.expected.get(self.shape..end) != Some(part) {
            self.fits = false;
        }
        self.shape = end;
    }
}

impl<'a> Fill<'a> {
    pub(super) fn new(families: &'a mut [Family], expected: &'a [u8]) -> Self {
        Self {
            families,
            expected,
            cursor: [0; FAMILIES.len()],
            shape: 0,
            fits: true,
        }
    }

    pub(super) fn complete(&self) -> bool {
        self.fits
            && self.shape == self.expected.len()
            && self
                .cursor
                .iter()
                .zip(self.families.iter())
                .all(|(&n, f)| n == f.mf.get_metric().len())
    }
}

/// The samples of the last scrape, labels and all: while the services, backends and optional
/// series stay the same, a scrape only rewrites their values, so its cost is reading the maps
/// and encoding the text.
pub(super) struct Layout {
    pub(super) families: Vec<Family>,
    pub(super) shape: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use prometheus::{
        Registry,
        core::{Collector, Desc},
    };

    use super::*;

    /// What the registry holds in the test: the families lent to it.
    struct Given(Mutex<Vec<MetricFamily>>, Vec<Desc>);

    impl Collector for Given {
        fn desc(&self) -> Vec<&Desc> {
            self.1.iter().collect()
        }
        fn collect(&self) -> Vec<MetricFamily> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn value(m: &Metric) -> f64 {
        m.get_counter().get_value()
    }

    /// A cached layout is filled in the walk's order, which is not the exposition's: each value
    /// must still land on its own labels after the registry's sort, scrape after scrape.
    #[test]
    fn a_filled_layout_keeps_each_value_on_its_labels() {
        const PACKETS: usize = 3; // lb_backend_packets_total
        let walk = [("svc-b", "2"), ("svc-a", "10"), ("svc-a", "9"), ("svc-c", "1")];
        let mut build = Build {
            families: FAMILIES.iter().map(Family::new).collect(),
            shape: Vec::new(),
        };
        for (i, (s, b)) in walk.iter().enumerate() {
            build.add(PACKETS, &[s, b], i as f64);
            build.shape(b"x\0\x01");
        }
        for f in &mut build.families {
            f.sort();
        }
        let (mut families, shape) = (build.families, build.shape);
        for round in 1..=3u32 {
            let mut fill = Fill::new(&mut families, &shape);
            for (i, (s, b)) in walk.iter().enumerate() {
                fill.add(PACKETS, &[s, b], f64::from(round * 100) + i as f64);
                fill.shape(b"x\0\x01");
            }
            assert!(fill.complete(), "round {round}: the walk fits its own layout");
            let lent = std::mem::take(&mut families[PACKETS].mf);
            let registry = Registry::new();
            let desc = Desc::new(
                FAMILIES[PACKETS].0.into(),
                "h".into(),
                vec!["service".into(), "backend".into()],
                Default::default(),
            )
            .unwrap();
            registry
                .register(Box::new(Given(Mutex::new(vec![lent]), vec![desc])))
                .unwrap();
            let gathered = registry.gather();
            let metrics = gathered[0].get_metric();
            let seen: Vec<(String, String, f64)> = metrics
                .iter()
                .map(|m| {
                    (
                        m.get_label()[0].value().into(),
                        m.get_label()[1].value().into(),
                        value(m),
                    )
                })
                .collect();
            let mut want: Vec<(String, String, f64)> = walk
                .iter()
                .enumerate()
                .map(|(i, (s, b))| (s.to_string(), b.to_string(), f64::from(round * 100) + i as f64))
                .collect();
            want.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            assert_eq!(seen, want, "round {round}");
            families[PACKETS].mf = gathered.into_iter().next().unwrap();
        }
        // A walk that differs from the layout (a backend gained a check) does not fit.
        let mut fill = Fill::new(&mut families, &shape);
        for (i, (s, b)) in walk.iter().enumerate() {
            fill.add(PACKETS, &[s, b], 0.0);
            fill.shape(if i == 2 { b"x\0\x03" } else { b"x\0\x01" });
        }
        assert!(!fill.complete());
        // Nor does one with a sample more.
        let mut fill = Fill::new(&mut families, &shape);
        for (s, b) in walk.iter().chain(&[("svc-d", "1")]) {
            fill.add(PACKETS, &[s, b], 0.0);
        }
        assert!(!fill.complete());
    }
}
