//! The soak test: many connections at a steady pace with the agent running,
//! its RSS and metrics sampled, passed when RSS stops growing after the
//! warm-up, no event is lost and the maps never fill.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use super::{
    SoakPlan, Tools, check_interrupted,
    loopback::{ClientCounters, Server, drive_connections},
    measure::{Scrape, process_memory, time_wait_sockets},
    metric_names::{EVENTS, EVENTS_LOST, TRACKED, TRACKED_LIMIT, UNTRACKED},
    mib, thousands,
    workload::Agent,
};

pub(super) struct SoakSample {
    pub(super) at: Duration,
    pub(super) rss: u64,
    pub(super) connections: u64,
    pub(super) time_wait: u64,
    /// How old the metrics of this sample are (`None`: none yet).
    pub(super) metrics_age: Option<Duration>,
    pub(super) lost: f64,
    pub(super) tracked: f64,
    pub(super) untracked: f64,
}

impl SoakSample {
    /// A note when the agent had not answered for a while.
    fn stale_note(&self) -> String {
        match self.metrics_age {
            Some(age) if age > Duration::from_secs(3) => {
                format!(" (metrics {} s old: the agent answers late)", age.as_secs())
            }
            None => " (the agent has not answered yet)".into(),
            Some(_) => String::new(),
        }
    }
}

pub(super) struct Soak {
    pub(super) planned: u64,
    pub(super) planned_duration: Duration,
    pub(super) duration: Duration,
    pub(super) warm_up: Duration,
    pub(super) sample_every: Duration,
    pub(super) samples: Vec<SoakSample>,
    pub(super) connections: u64,
    pub(super) errors: u64,
    limit: f64,
    /// Totals over the whole soak, read at its end.
    pub(super) lost: f64,
    pub(super) untracked: f64,
    pub(super) events: f64,
}

impl Soak {
    /// RSS at the end of the warm-up, and the most after it.
    pub(super) fn growth(&self) -> Option<(u64, u64)> {
        let start = self.samples.iter().find(|s| s.at >= self.warm_up)?.rss;
        let most = self
            .samples
            .iter()
            .filter(|s| s.at >= self.warm_up)
            .map(|s| s.rss)
            .max()?;
        Some((start, most))
    }

    pub(super) fn growth_ok(&self) -> bool {
        self.growth()
            .is_some_and(|(start, most)| (most as f64) < start as f64 * 1.05)
    }

    pub(super) fn lost(&self) -> f64 {
        self.lost
    }

    pub(super) fn maps_ok(&self) -> bool {
        self.untracked == 0.0 && self.samples.iter().all(|s| s.tracked < self.limit)
    }

    pub(super) fn passed(&self) -> bool {
        self.growth_ok() && self.lost() == 0.0 && self.maps_ok()
    }
}

pub(super) fn soak(plan: &SoakPlan, tools: &Tools) -> anyhow::Result<Soak> {
    check_interrupted()?;
    let rate = plan.connections as f64 / plan.duration.as_secs_f64();
    println!(
        "bench: soak: {} connections over {} s ({:.0}/s)",
        thousands(plan.connections),
        plan.duration.as_secs(),
        rate
    );
    let server = Server::start(4, false)?;
    let agent = Agent::start(tools.tracer)?;
    thread::sleep(Duration::from_secs(1));
    let base = agent.scrape()?;
    let counters = ClientCounters::default();
    let started = Instant::now();
    let mut samples = Vec::new();
    // Scraped in the background: a busy agent answers late, and RSS is still
    // sampled on time.
    let latest: Mutex<Option<(Instant, Scrape)>> = Mutex::new(None);
    let scraping = AtomicBool::new(true);
    thread::scope(|scope| -> anyhow::Result<()> {
        let client = scope.spawn(|| {
            drive_connections(
                &server.addrs,
                Some(rate),
                // Some slack for a client that falls behind.
                plan.duration + plan.duration / 5,
                Some(plan.connections),
                &counters,
            )
        });
        scope.spawn(|| {
            while scraping.load(Ordering::Relaxed) {
                if let Ok(scrape) = agent.scrape() {
                    *latest.lock().expect("scrape lock") = Some((Instant::now(), scrape));
                }
                for _ in 0..10 {
                    if scraping.load(Ordering::Relaxed) {
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
        let sampled = (|| -> anyhow::Result<()> {
            let mut next = started + plan.sample_every;
            loop {
                while Instant::now() < next && !client.is_finished() {
                    thread::sleep(Duration::from_millis(100));
                }
                let finished = client.is_finished();
                next += plan.sample_every;
                let rss = process_memory(agent.pid())?.rss;
                let scrape = latest.lock().expect("scrape lock").clone();
                let (age, now) = match scrape {
                    Some((at, scrape)) => (Some(at.elapsed()), scrape),
                    None => (None, base.clone()),
                };
                let sample = SoakSample {
                    at: started.elapsed(),
                    rss,
                    connections: counters.done.load(Ordering::Relaxed),
                    time_wait: time_wait_sockets(),
                    metrics_age: age,
                    lost: now.delta(&base, EVENTS_LOST),
                    tracked: now.get(TRACKED),
                    untracked: now.delta(&base, UNTRACKED),
                };
                println!(
                    "bench: soak {:>4} s: {:>9} connections, RSS {}, {} tracked, {} lost, {} \
                     in TIME_WAIT{}",
                    sample.at.as_secs(),
                    thousands(sample.connections),
                    mib(sample.rss),
                    thousands(sample.tracked as u64),
                    thousands(sample.lost as u64),
                    thousands(sample.time_wait),
                    sample.stale_note()
                );
                samples.push(sample);
                if finished {
                    return Ok(());
                }
                check_interrupted()?;
            }
        })();
        scraping.store(false, Ordering::Relaxed);
        sampled
    })?;
    // The totals, however long the agent takes to answer.
    let end = agent.scrape()?;
    agent.stop();
    server.stop();
    let result = Soak {
        planned: plan.connections,
        planned_duration: plan.duration,
        duration: started.elapsed(),
        warm_up: plan.warm_up,
        sample_every: plan.sample_every,
        samples,
        connections: counters.done.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        limit: end.get(TRACKED_LIMIT),
        lost: end.delta(&base, EVENTS_LOST),
        untracked: end.delta(&base, UNTRACKED),
        events: end.delta(&base, EVENTS),
    };
    println!(
        "bench: soak {}",
        if result.passed() { "passed" } else { "FAILED" }
    );
    Ok(result)
}
