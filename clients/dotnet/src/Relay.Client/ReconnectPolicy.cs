using System;

namespace Relay.Client
{
    /// <summary>What the client does after a connection ended.</summary>
    public enum ReconnectAction
    {
        /// <summary>Terminal: never reconnect.</summary>
        Stop,
        /// <summary>Reconnect after a small jitter (the first time after a welcomed session).</summary>
        AtOnce,
        /// <summary>Reconnect after full-jitter exponential backoff.</summary>
        Backoff,
        /// <summary>Reconnect after half to all of the backoff cap (the node said 1008).</summary>
        LongBackoff,
    }

    /// <summary>
    /// The close-code rules, as pure functions: which action follows a close, and how long
    /// to wait. The client only applies them, so they are tested without sockets.
    /// </summary>
    public static class ReconnectPolicy
    {
        public const int Normal = 1000;
        public const int ProtocolError = 1002;
        public const int Abnormal = 1006;
        public const int PolicyViolation = 1008;
        public const int TooLarge = 1009;
        public const int ServiceRestart = 1012;
        public const int Replaced = 4000;
        public const int Unauthorized = 4001;
        public const int Forbidden = 4003;
        public const int TokenExpired = 4500;
        public const int TooSlow = 4508;

        /// <summary>True for 4000-4499: the server says do not come back.</summary>
        public static bool IsTerminal(int code)
        {
            return code >= 4000 && code <= 4499;
        }

        /// <summary>
        /// The action after a close with <paramref name="code"/>.
        /// <paramref name="hasTokenProvider"/>: a new token can be asked for (4500 then
        /// reconnects at once, 4001 once after backoff). <paramref name="retriedAfter4001"/>:
        /// the previous close was a 4001 already retried with a fresh token, so this one stops.
        /// </summary>
        public static ReconnectAction Plan(int code, bool hasTokenProvider, bool retriedAfter4001)
        {
            if (code == TokenExpired)
                return hasTokenProvider ? ReconnectAction.AtOnce : ReconnectAction.Stop;
            if (code == Unauthorized)
                return hasTokenProvider && !retriedAfter4001 ? ReconnectAction.Backoff : ReconnectAction.Stop;
            if (IsTerminal(code))
                return ReconnectAction.Stop;
            if (code == ServiceRestart || (code >= 4500 && code <= 4999))
                return ReconnectAction.AtOnce;
            if (code == PolicyViolation)
                return ReconnectAction.LongBackoff;
            return ReconnectAction.Backoff;
        }

        /// <summary>Full jitter: uniform between 0 and min(cap, base * 2^attempt).</summary>
        public static TimeSpan BackoffDelay(int attempt, TimeSpan backoffBase, TimeSpan cap, Random rng)
        {
            double ceiling = backoffBase.TotalSeconds * Math.Pow(2.0, Math.Min(Math.Max(attempt, 0), 62));
            ceiling = Math.Min(cap.TotalSeconds, ceiling);
            return TimeSpan.FromSeconds(rng.NextDouble() * ceiling);
        }

        /// <summary>
        /// Time to wait before the next connect. <paramref name="attempt"/> counts reconnects
        /// since the last welcome: "at once" is at once only right after a welcomed session,
        /// so a node that keeps answering 1012 gets ordinary backoff, not a tight loop.
        /// </summary>
        public static TimeSpan Delay(
            ReconnectAction action, int attempt, TimeSpan backoffBase, TimeSpan cap, TimeSpan atOnceJitter, Random rng)
        {
            switch (action)
            {
                case ReconnectAction.AtOnce:
                    if (attempt == 0)
                    {
                        double most = Math.Min(atOnceJitter.TotalSeconds, cap.TotalSeconds);
                        return TimeSpan.FromSeconds(rng.NextDouble() * most);
                    }
                    return BackoffDelay(attempt, backoffBase, cap, rng);
                case ReconnectAction.LongBackoff:
                    return TimeSpan.FromSeconds(cap.TotalSeconds / 2 + rng.NextDouble() * cap.TotalSeconds / 2);
                case ReconnectAction.Backoff:
                    return BackoffDelay(attempt, backoffBase, cap, rng);
                default:
                    return TimeSpan.Zero;
            }
        }
    }
}
