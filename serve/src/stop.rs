//! Stop strings over streamed text: text is released only once it cannot
//! be the start of a stop string, and cut before the first stop string.
//! Pure; the caller closes the agent's stream when a stop is found.

#[derive(Debug, Default)]
pub struct StopScanner {
    stops: Vec<String>,
    /// Text received but not yet released (it may begin a stop string).
    held: String,
}

/// What one piece of text gives.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan {
    /// Text to send now.
    pub text: String,
    /// A stop string was found: nothing after `text` is to be sent.
    pub stopped: bool,
}

impl StopScanner {
    pub fn new(stops: Vec<String>) -> Self {
        StopScanner {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> Scan {
        self.held.push_str(piece);
        if self.stops.is_empty() {
            return Scan {
                text: std::mem::take(&mut self.held),
                stopped: false,
            };
        }
        // The earliest stop string wins.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Scan {
                text,
                stopped: true,
            };
        }
        // Hold back the longest tail that begins some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_prefix_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Scan {
            text,
            stopped: false,
        }
    }

    /// What is held when the generation ends without a stop.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Bytes of the longest suffix of `text` that is a proper prefix of `stop`,
/// on character boundaries.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start)
                && stop.is_char_boundary(n)
                && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopScanner::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = s.push(p);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&s.finish());
        (out, false)
    }

    #[test]
    fn text_is_cut_at_the_first_stop_string_even_across_pieces() {
        assert_eq!(
            run(&["\n\n"], &["Paris", ".\n", "\nThe"]),
            ("Paris.".into(), true)
        );
        assert_eq!(
            run(&["END", "."], &["a b", ". c END"]),
            ("a b".into(), true)
        );
        assert_eq!(run(&["xyz"], &["ab", "xy", "q"]), ("abxyq".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
    }

    #[test]
    fn only_a_possible_stop_prefix_is_held_back() {
        let mut s = StopScanner::new(vec!["STOP".into()]);
        assert_eq!(s.push("hello ST").text, "hello ");
        assert_eq!(s.push("ART").text, "START");
        assert_eq!(s.finish(), "");
    }
}
