/// A rectangle of a problem's query rows and keys, with the causal and window rules re-expressed in
/// the rectangle's own coordinates, so that any backend computes it as an ordinary problem. Its
/// (O, LSE) is the partial result over those keys, which `mergePartialRows` combines exactly with the
/// partials over the other keys: how split-KV across devices and the ring of context-parallel
/// attention cut one problem into pieces.
public struct AttentionBlock: Sendable, Equatable {
    /// The rows that see at least one key of the requested range (a sub-range of the requested rows);
    /// the other requested rows see none of these keys: their partial is O = 0, LSE = -inf.
    public let queries: Range<Int>
    /// The keys that at least one row sees (a sub-range of the requested keys).
    public let keys: Range<Int>
    /// Causal and window rules of the block as a problem of `queries.count` rows and `keys.count`
    /// keys (bottom-right aligned, as always), equivalent to the full problem's rules on the block.
    public let causal: Bool
    public let window: AttentionWindow?

    /// The block's options: the full problem's scale (resolved) and softcap, these rules, and the
    /// mask cut to the block (a copy) when the problem has one.
    public func options(of problem: AttentionProblem) throws(AttentionError) -> AttentionOptions {
        AttentionOptions(
            scale: problem.scale, softcap: problem.options.softcap, causal: causal, window: window,
            mask: try problem.options.mask?.slice(
                problem, batches: 0..<problem.batch, heads: 0..<problem.queryHeads, queries: queries, keys: keys))
    }
}

extension AttentionProblem {
    /// The block of rows `queries` and keys `keys` of this problem: both trimmed to what is visible
    /// (causal and window rules; the mask is not inspected), nil when no row sees any of the keys.
    ///
    /// Visibility is an interval per row, `[lo(i), hi(i)]`, both ends non-decreasing in i; a block's
    /// rows keep the slope, so the full rule restricted to the block is a window of the block:
    /// with `delta` the distance between the last row's true key position and its position in the
    /// block, left' = left - delta and right' = right + delta, both >= 0 after trimming.
    public func block(queries: Range<Int>, keys: Range<Int>) -> AttentionBlock? {
        let q = queries.clamped(to: 0..<queryLength)
        let k = keys.clamped(to: 0..<keyLength)
        guard !q.isEmpty, !k.isEmpty else { return nil }
        func sees(_ i: Int) -> Bool {
            let (lo, hi) = visibleKeys(forQuery: i)
            return max(lo, k.lowerBound) <= min(hi, k.upperBound - 1)
        }
        guard let first = q.first(where: sees) else { return nil }
        // Rows that see the range are contiguous (both ends of the interval are monotone).
        var last = first
        while last + 1 < q.upperBound, sees(last + 1) { last += 1 }
        let keyLow = max(visibleKeys(forQuery: first).lo, k.lowerBound)
        let keyHigh = min(visibleKeys(forQuery: last).hi, k.upperBound - 1)
        let count = keyHigh - keyLow + 1
        guard options.causal || options.window != nil else {
            return AttentionBlock(queries: first..<last + 1, keys: keyLow..<keyHigh + 1, causal: false, window: nil)
        }
        let window = options.window?.clamped(to: keyLength + queryLength)
        // The full rule as one window: right side 0 under causal (or the window's, if smaller).
        let left = window.map { $0.left } ?? -1
        var right = window.map { $0.right } ?? -1
        if options.causal { right = right < 0 ? 0 : min(right, 0) }
        // The last row's key position in the block, truly and as the block's bottom-right alignment has it.
        let delta = (last + keyLength - queryLength - keyLow) - (count - 1)
        let blockLeft = left < 0 ? -1 : left - delta
        let blockRight = right < 0 ? -1 : right + delta
        let blockWindow: AttentionWindow? =
            blockLeft < 0 && blockRight < 0 ? nil : AttentionWindow(left: blockLeft, right: blockRight)
        return AttentionBlock(
            queries: first..<last + 1, keys: keyLow..<keyHigh + 1, causal: false, window: blockWindow)
    }
}

extension AttentionMask {
    /// The part of this mask over `batches` × `heads` × `queries` × `keys` of `problem`, in the mask's
    /// own broadcast form (a dimension of size 1 stays 1): the mask itself when the part is all of it
    /// (a split by heads of a mask broadcast over heads), else a copy of those rows.
    public func slice(
        _ problem: AttentionProblem, batches: Range<Int>, heads: Range<Int>, queries: Range<Int>, keys: Range<Int>
    ) throws(AttentionError) -> AttentionMask {
        guard let layout = problem.maskLayout else { return self }
        let batchRange = layout.batchStride == 0 ? 0..<1 : batches
        let headRange = layout.headStride == 0 ? 0..<1 : heads
        var sliced = [batchRange.count, headRange.count, queries.count, keys.count]
        // Keep the mask's rank: leading broadcast dimensions it omitted stay omitted.
        sliced.removeFirst(4 - shape.count)
        let starts = [batchRange.lowerBound, headRange.lowerBound, queries.lowerBound, keys.lowerBound]
        if sliced == shape, starts.allSatisfy({ $0 == 0 }) { return self }
        // Whole rows of keys at a time (a mask row's keys are adjacent).
        func gather<T>(_ values: [T]) -> [T] {
            var out: [T] = []
            out.reserveCapacity(batchRange.count * headRange.count * queries.count * keys.count)
            for b in batchRange {
                for h in headRange {
                    for i in queries {
                        let row = layout.offset(batch: b, head: h, row: i)
                        out.append(contentsOf: values[(row + keys.lowerBound)..<(row + keys.upperBound)])
                    }
                }
            }
            return out
        }
        switch values {
        case .boolean(let allowed): return try AttentionMask(shape: sliced, allowed: gather(allowed))
        case .additive(let added): return try AttentionMask(shape: sliced, additive: gather(added))
        }
    }
}

extension TensorView {
    /// The same operand starting `elements` elements later, with explicit strides `strides` (those of
    /// the full operand, so that a sub-range of heads, rows or batches is addressed in place).
    public func advanced(by elements: Int, strides: Strides) -> TensorView {
        TensorView(
            address: address + elements * storage.byteSize, storage: storage, strides: strides,
            capacity: capacity - elements)
    }
}
