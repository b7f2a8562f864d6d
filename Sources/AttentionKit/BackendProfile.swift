import AttentionBLAS
import AttentionCore
import AttentionOpenCL

/// What the dispatcher knows about one backend on one device.
public struct BackendProfile: Codable, Sendable, Equatable {
    /// Which backend.
    public var backend: BackendID
    public var device: String
    /// GFLOP/s on prefill-like problems, by head dimension (nearest is used).
    public var gflops: [HeadDimCurve]
    /// K/V bytes read per second (GB/s) on decode-like problems (`AttentionProblem.Regime`), by key length.
    public var decodeGBps: ThroughputCurve
    /// Fixed cost of a call: launches, buffer set-up, thread wake-up.
    public var overheadSeconds: Double
    /// Host-device copy rate for devices that do not work on host memory in place (nil: in place).
    public var transferGBps: Double?
    /// Memory the backend's workspace must fit in.
    public var memoryBytes: UInt64
    /// Tuned BLAS tilings by head dimension (BLAS only).
    public var blasTilings: [Tuned<BLASTiling>]?
    /// Tuned OpenCL kernel configurations by head dimension (OpenCL only).
    public var openclConfigs: [Tuned<OpenCLKernelConfig>]?
    /// How BLAS prefill tiles compute their products, where `attnbench tune` found one faster than
    /// the default (BLAS only; nil: `.automatic`).
    public var blasProducts: BLASProducts?

    public struct HeadDimCurve: Codable, Sendable, Equatable {
        public var headDim: Int
        public var curve: ThroughputCurve
        public init(headDim: Int, curve: ThroughputCurve) {
            self.headDim = headDim
            self.curve = curve
        }
    }

    public init(
        backend: BackendID, device: String, gflops: [HeadDimCurve], decodeGBps: ThroughputCurve,
        overheadSeconds: Double, transferGBps: Double? = nil, memoryBytes: UInt64
    ) {
        self.backend = backend
        self.device = device
        self.gflops = gflops
        self.decodeGBps = decodeGBps
        self.overheadSeconds = overheadSeconds
        self.transferGBps = transferGBps
        self.memoryBytes = memoryBytes
    }

    /// GFLOP/s expected for head dimension `d` (the nearest measured one) at key length `nk`.
    public func gflops(headDim d: Int, keyLength nk: Int) -> Double {
        guard let nearest = gflops.min(by: { abs($0.headDim - d) < abs($1.headDim - d) }) else { return 1 }
        return nearest.curve.value(at: nk)
    }
}
