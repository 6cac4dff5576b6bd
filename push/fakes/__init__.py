"""Local stand-ins of Apple's APNs and Google's FCM, spoken to by the real client
libraries, for tests, the simulator and the embedded default of `softrelay serve`."""
