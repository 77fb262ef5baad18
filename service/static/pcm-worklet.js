// The Live mode's audio tap: hands each render quantum of the microphone, mixed to mono, to the
// page (which resamples it to the stream's rate and sends it over /v1/stream).
"use strict";

class PcmTap extends AudioWorkletProcessor {
  process(inputs) {
    const channels = inputs[0];
    if (channels && channels.length) {
      const mono = new Float32Array(channels[0].length);
      for (const channel of channels) {
        for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / channels.length;
      }
      this.port.postMessage(mono, [mono.buffer]);
    }
    return true;
  }
}

registerProcessor("pcm-tap", PcmTap);
