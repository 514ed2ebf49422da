/**
 * At most `perSecond` events a second pass; the rest are counted. The next event that passes carries how
 * many were held back before it, so a flood shows up as a few lines with counts.
 */
export class EventLimiter {
  #windowStart = -Infinity
  #inWindow = 0
  #held = 0
  /** Events held back since the start. */
  total = 0

  readonly #perSecond: number
  constructor(perSecond: number) {
    this.#perSecond = perSecond
  }

  /** Whether this event passes; `held`: events held back since the last one that passed. */
  admit(now: number = Date.now()): { pass: boolean; held: number } {
    if (now - this.#windowStart >= 1000) {
      this.#windowStart = now
      this.#inWindow = 0
    }
    if (this.#inWindow++ >= this.#perSecond) {
      this.#held++
      this.total++
      return { pass: false, held: 0 }
    }
    const held = this.#held
    this.#held = 0
    return { pass: true, held }
  }
}
