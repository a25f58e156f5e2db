using System;
using Newtonsoft.Json;
using Newtonsoft.Json.Linq;

namespace Relay.Client
{
    /// <summary>One event from the server, handed to the app once (duplicates are dropped by id).</summary>
    public sealed class MessageReceivedEventArgs : EventArgs
    {
        internal MessageReceivedEventArgs(string id, string bizId, string eventName, string dataJson, double ts)
        {
            Id = id;
            BizId = bizId;
            Event = eventName;
            DataJson = dataJson;
            Timestamp = ts;
        }

        /// <summary>The stream id <c>&lt;ms&gt;-&lt;seq&gt;</c>; compare with <see cref="StreamId"/>, never as strings.</summary>
        public string Id { get; private set; }

        public string BizId { get; private set; }

        /// <summary>The event name, e.g. <c>label.created</c>.</summary>
        public string Event { get; private set; }

        /// <summary>The raw JSON of the event's <c>data</c>, for the app's own serializer.</summary>
        public string DataJson { get; private set; }

        /// <summary>Publish time, seconds since the Unix epoch.</summary>
        public double Timestamp { get; private set; }

        /// <summary><see cref="DataJson"/> deserialized with Newtonsoft.Json (dates left as strings).</summary>
        public T Data<T>()
        {
            var settings = new JsonSerializerSettings { DateParseHandling = DateParseHandling.None };
            return JsonConvert.DeserializeObject<T>(DataJson, settings);
        }

        /// <summary><see cref="DataJson"/> as a JToken (dates left as strings).</summary>
        public JToken DataToken()
        {
            using (var reader = new JsonTextReader(new System.IO.StringReader(DataJson)))
            {
                reader.DateParseHandling = DateParseHandling.None;
                return JToken.ReadFrom(reader);
            }
        }
    }

    /// <summary>A connection was welcomed by a node.</summary>
    public sealed class ConnectedEventArgs : EventArgs
    {
        internal ConnectedEventArgs(bool? recovered, long replayed, string lastId, string node, string session)
        {
            Recovered = recovered;
            Replayed = replayed;
            LastId = lastId;
            Node = node;
            Session = session;
        }

        /// <summary>
        /// Null when the client had no position to resume from. True: every event since the
        /// position is replayed. False: the node cannot prove that (history trimmed or expired) —
        /// reload your state from the backend.
        /// </summary>
        public bool? Recovered { get; private set; }

        /// <summary>How many events are replayed right after this welcome.</summary>
        public long Replayed { get; private set; }

        /// <summary>The last replayed id, or the head of history when none was replayed.</summary>
        public string LastId { get; private set; }

        public string Node { get; private set; }

        public string Session { get; private set; }
    }

    /// <summary>A connection (or an attempt at one) ended.</summary>
    public sealed class DisconnectedEventArgs : EventArgs
    {
        internal DisconnectedEventArgs(int code, string reason, bool willReconnect, TimeSpan delay)
        {
            Code = code;
            Reason = reason;
            WillReconnect = willReconnect;
            ReconnectDelay = delay;
        }

        /// <summary>The close code; 1006 when there was no close frame or no connection.</summary>
        public int Code { get; private set; }

        public string Reason { get; private set; }

        /// <summary>False when the client stopped: StopAsync, or a terminal code (4000-4499).</summary>
        public bool WillReconnect { get; private set; }

        /// <summary>How long the client waits before the next attempt (zero when it stopped).</summary>
        public TimeSpan ReconnectDelay { get; private set; }
    }

    /// <summary>The server ended the client for good (4000-4499, or 4500 with no token provider).</summary>
    public sealed class RelayClosedException : Exception
    {
        public RelayClosedException(int code, string reason)
            : base(("connection closed for good: " + code + " " + reason).TrimEnd())
        {
            Code = code;
            Reason = reason;
        }

        public int Code { get; private set; }

        public string Reason { get; private set; }
    }
}
