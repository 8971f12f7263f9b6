//! Splitting list results for the streaming list RPCs: by encoded size, so
//! that no message comes near the 16 MiB kubelet accepts (nor tonic's
//! default 4 MiB) however large the items (labels and annotations) are.

/// Encoded bytes per message at most (a single larger item still goes out,
/// alone).
pub const CHUNK_BYTES: usize = 2 << 20;

pub fn by_size<T: prost::Message>(items: Vec<T>) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0;
    for item in items {
        // Field tag + length prefix: a few bytes per repeated item.
        let n = item.encoded_len() + 10;
        if !cur.is_empty() && size + n > CHUNK_BYTES {
            out.push(std::mem::take(&mut cur));
            size = 0;
        }
        size += n;
        cur.push(item);
    }
    if !cur.is_empty() || out.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cri_proto::v1 as cri;
    use prost::Message;

    #[test]
    fn splits_by_encoded_size_and_keeps_order() {
        let big = "x".repeat(512 << 10);
        let items: Vec<cri::Container> = (0..10)
            .map(|i| cri::Container {
                id: format!("c{i}"),
                annotations: [("a".to_string(), big.clone())].into(),
                ..Default::default()
            })
            .collect();
        let chunks = by_size(items);
        assert_eq!(chunks.len(), 4, "2 MiB chunks of three ~512 KiB items");
        assert!(chunks
            .iter()
            .all(|c| c.iter().map(|i| i.encoded_len()).sum::<usize>() <= CHUNK_BYTES));
        let ids: Vec<String> = chunks.into_iter().flatten().map(|c| c.id).collect();
        assert_eq!(ids, (0..10).map(|i| format!("c{i}")).collect::<Vec<_>>());
        // An empty result is one empty message.
        assert_eq!(by_size(Vec::<cri::Container>::new()).len(), 1);
    }
}
