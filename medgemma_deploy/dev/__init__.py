"""What developers and demos use, never a deployment: tiny random models of the real classes
(:mod:`.testmodels`), synthetic studies (:mod:`.synthetic`), the demo (:mod:`.demo`), the
benchmarks (:mod:`.bench`) and the gRPC stub generator (:mod:`.protos_build`)."""
