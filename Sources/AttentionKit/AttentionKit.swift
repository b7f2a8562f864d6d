// The umbrella module: every backend, the machine facts and backend selection, in one import.
@_exported import AttentionBLAS
@_exported import AttentionCore
@_exported import AttentionMachine
@_exported import AttentionOpenCL
