using System;
using System.Diagnostics;
using System.Globalization;
using System.IO;
using System.Net.WebSockets;
using System.Security.Cryptography;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace Relay.Client
{
    /// <summary>
    /// A reconnecting, resuming WebSocket client of one client id.
    /// <para>
    /// It reconnects forever with full-jitter backoff, resumes from the last handled id
    /// (<c>since=</c>), drops repeats by id, and stops only when the server says so
    /// (4000-4499) or the app calls <see cref="StopAsync"/>. Events are raised one at a
    /// time, in order, on the <see cref="SynchronizationContext"/> captured by
    /// <see cref="Start"/> (the WPF Dispatcher), else on a pool thread. The next message is
    /// read only after the previous handler returned, and the position advances only then:
    /// every event reaches the app at least once, and never twice in one process.
    /// </para>
    /// </summary>
    public sealed class RelayClient : IDisposable
    {
        private readonly RelayClientOptions _options;
        private readonly string _instance;
        private readonly Random _rng = new Random();
        private readonly object _gate = new object();
        private readonly CancellationTokenSource _stop = new CancellationTokenSource();
        private readonly TaskCompletionSource<bool> _completion =
            new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
        // Completed when the client no longer waits for handlers: Dispose, or a StopAsync
        // that waited CloseTimeout (the UI thread may be blocked on it).
        private readonly TaskCompletionSource<bool> _abandon =
            new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);

        private SynchronizationContext _context;
        private Task _loop;
        private volatile bool _stopping;
        private volatile Connection _current;
        private StreamId? _position; // the loop's own; others read _lastId
        private volatile string _lastId;
        private StreamId? _ackWanted; // under _gate
        private int _handshakes;
        private int _connects;
        private long _duplicates;

        public RelayClient(RelayClientOptions options)
        {
            if (options == null)
                throw new ArgumentNullException("options");
            _options = options.Validated();
            _instance = NewInstanceName();
        }

        /// <summary>A message to handle. The next one waits until this handler returns.</summary>
        public event EventHandler<MessageReceivedEventArgs> MessageReceived;

        /// <summary>A node welcomed the client; check <see cref="ConnectedEventArgs.Recovered"/>.</summary>
        public event EventHandler<ConnectedEventArgs> Connected;

        /// <summary>A connection or an attempt ended; <see cref="DisconnectedEventArgs.WillReconnect"/> says what follows.</summary>
        public event EventHandler<DisconnectedEventArgs> Disconnected;

        /// <summary>Where the next connect resumes: the last handled id (or the welcome's head of history).</summary>
        public string LastId { get { return _lastId; } }

        public bool IsConnected
        {
            get
            {
                var conn = _current;
                return conn != null && conn.Welcomed;
            }
        }

        /// <summary>Welcomed connections so far.</summary>
        public int Connects { get { return Volatile.Read(ref _connects); } }

        /// <summary>Messages dropped because their id was at or below the position.</summary>
        public long Duplicates { get { return Interlocked.Read(ref _duplicates); } }

        /// <summary>
        /// Completes when the client stopped: normally after <see cref="StopAsync"/>, faulted
        /// with <see cref="RelayClosedException"/> when the server ended it for good.
        /// </summary>
        public Task Completion { get { return _completion.Task; } }

        /// <summary>
        /// Starts connecting in the background and returns at once. Call it on the UI thread
        /// to have events raised there. A client starts once; make a new one to start again.
        /// </summary>
        public void Start()
        {
            lock (_gate)
            {
                if (_stopping)
                    throw new ObjectDisposedException("RelayClient", "the client is stopped; make a new one");
                if (_loop != null)
                    throw new InvalidOperationException("the client is already started");
                _context = SynchronizationContext.Current;
                LoadPosition(); // LastId is known from here on
                _loop = Task.Run(new Func<Task>(RunAsync));
            }
        }

        /// <summary>
        /// Sends the pending ack, closes with 1000 (waiting up to CloseTimeout for the
        /// server's close frame) and stops. Await it; blocking the UI thread on it delays
        /// the stop by CloseTimeout, because the client waits for handlers queued there.
        /// </summary>
        public async Task StopAsync()
        {
            Task loop;
            lock (_gate)
            {
                _stopping = true;
                loop = _loop;
            }
            _stop.Cancel();
            var abandon = Task.Delay(_options.CloseTimeout).ContinueWith(
                t => _abandon.TrySetResult(true), TaskScheduler.Default);
            var conn = _current;
            if (conn != null)
                await conn.CloseAsync(ReconnectPolicy.Normal, "client stopped", true).ConfigureAwait(false);
            if (loop != null)
                await loop.ConfigureAwait(false);
            else
                _completion.TrySetResult(true);
            GC.KeepAlive(abandon);
        }

        /// <summary>Stops at once without a close handshake; no event is raised after it.</summary>
        public void Dispose()
        {
            lock (_gate)
            {
                _stopping = true;
                if (_loop == null)
                    _completion.TrySetResult(true);
            }
            _abandon.TrySetResult(true);
            _stop.Cancel();
            var conn = _current;
            if (conn != null)
                conn.Abort("client disposed");
        }

        // -- the loop ----------------------------------------------------------------------

        private async Task RunAsync()
        {
            RelayClosedException terminal = null;
            try
            {
                int attempt = 0;
                bool retriedAfter4001 = false;
                while (!_stopping)
                {
                    Outcome outcome;
                    try
                    {
                        outcome = await ServeOnceAsync().ConfigureAwait(false);
                    }
                    catch (Exception ex) // a bug must not end "reconnect forever"
                    {
                        Log(RelayLogLevel.Error, "client.failed client_id=" + _options.ClientId + " error=" + ex);
                        outcome = new Outcome(ReconnectPolicy.Abnormal, "client error: " + ex.GetType().Name, false);
                    }
                    if (outcome.Welcomed)
                    {
                        attempt = 0;
                        retriedAfter4001 = false;
                    }
                    if (_stopping)
                    {
                        await RaiseAsync(Disconnected, new DisconnectedEventArgs(outcome.Code, outcome.Reason, false, TimeSpan.Zero)).ConfigureAwait(false);
                        break;
                    }
                    var action = ReconnectPolicy.Plan(outcome.Code, _options.TokenProvider != null, retriedAfter4001);
                    if (action == ReconnectAction.Stop)
                    {
                        terminal = new RelayClosedException(outcome.Code, outcome.Reason);
                        Log(RelayLogLevel.Warning, "client.stopped client_id=" + _options.ClientId + " code=" + outcome.Code + " reason=" + outcome.Reason);
                        await RaiseAsync(Disconnected, new DisconnectedEventArgs(outcome.Code, outcome.Reason, false, TimeSpan.Zero)).ConfigureAwait(false);
                        break;
                    }
                    // Only a welcome clears it: a failed connect between two 4001s does not
                    // make the second one (with a fresh token) worth another try.
                    if (outcome.Code == ReconnectPolicy.Unauthorized)
                        retriedAfter4001 = true;
                    TimeSpan delay = ReconnectPolicy.Delay(action, attempt, _options.BackoffBase, _options.BackoffMax, _options.AtOnceJitter, _rng);
                    attempt++;
                    Log(RelayLogLevel.Info, "client.reconnecting client_id=" + _options.ClientId + " code=" + outcome.Code
                        + " reason=" + outcome.Reason + " delay=" + delay.TotalSeconds.ToString("0.000", CultureInfo.InvariantCulture));
                    await RaiseAsync(Disconnected, new DisconnectedEventArgs(outcome.Code, outcome.Reason, true, delay)).ConfigureAwait(false);
                    try
                    {
                        await Task.Delay(delay, _stop.Token).ConfigureAwait(false);
                    }
                    catch (OperationCanceledException)
                    {
                    }
                }
            }
            catch (Exception ex)
            {
                Log(RelayLogLevel.Error, "client.failed client_id=" + _options.ClientId + " error=" + ex);
            }
            finally
            {
                _current = null;
                if (terminal != null)
                    _completion.TrySetException(terminal);
                else
                    _completion.TrySetResult(true);
            }
        }

        private void LoadPosition()
        {
            if (_options.CursorStore == null)
                return;
            string saved;
            try
            {
                saved = _options.CursorStore.Load();
            }
            catch (Exception ex)
            {
                Log(RelayLogLevel.Warning, "client.cursor_unreadable client_id=" + _options.ClientId + " error=" + ex.Message);
                return;
            }
            StreamId id;
            if (saved != null && StreamId.TryParse(saved, out id))
                MoveTo(id, false);
        }

        private void MoveTo(StreamId id, bool save)
        {
            _position = id;
            _lastId = id.ToString();
            if (!save || _options.CursorStore == null)
                return;
            try
            {
                _options.CursorStore.Save(_lastId);
            }
            catch (Exception ex)
            {
                Log(RelayLogLevel.Warning, "client.cursor_unsaved client_id=" + _options.ClientId + " error=" + ex.Message);
            }
        }

        /// <summary>One connection from the token to the close: (close code, reason, welcomed).</summary>
        private async Task<Outcome> ServeOnceAsync()
        {
            string token = null;
            if (_options.TokenProvider != null)
            {
                try
                {
                    token = await _options.TokenProvider(_stop.Token).ConfigureAwait(false);
                }
                catch (Exception ex)
                {
                    if (_stopping)
                        return new Outcome(ReconnectPolicy.Abnormal, "client stopped", false);
                    Log(RelayLogLevel.Warning, "client.token_failed client_id=" + _options.ClientId + " error=" + ex.GetType().Name + ": " + ex.Message);
                    return new Outcome(ReconnectPolicy.Abnormal, "token provider failed: " + ex.GetType().Name, false);
                }
                if (string.IsNullOrEmpty(token))
                    token = null;
            }
            int n = Interlocked.Increment(ref _handshakes);
            string attempt = _instance + "." + Math.Min(n, 999999999).ToString(CultureInfo.InvariantCulture);
            bool inQuery = _options.SendTokenInQuery;
            Uri uri = ConnectUrl.Build(_options.Url, _options.ClientId, _lastId, attempt, inQuery ? token : null);
            var ws = new ClientWebSocket();
            ws.Options.AddSubProtocol(_options.Format == RelayFormat.MessagePack ? ConnectUrl.SubprotocolMessagePack : ConnectUrl.SubprotocolJson);
            ws.Options.KeepAliveInterval = TimeSpan.Zero; // liveness is the heartbeat below
            if (token != null && !inQuery)
                ws.Options.SetRequestHeader("Authorization", "Bearer " + token);
            try
            {
                using (var cts = CancellationTokenSource.CreateLinkedTokenSource(_stop.Token))
                {
                    cts.CancelAfter(_options.ConnectTimeout);
                    await ws.ConnectAsync(uri, cts.Token).ConfigureAwait(false);
                }
            }
            catch (Exception ex)
            {
                ws.Dispose();
                if (_stopping)
                    return new Outcome(ReconnectPolicy.Abnormal, "client stopped", false);
                string why = ex is OperationCanceledException ? "timed out" : Redact(Innermost(ex), token);
                return new Outcome(ReconnectPolicy.Abnormal, "connect failed: " + why, false);
            }
            var conn = new Connection(this, ws);
            _current = conn;
            Task keeper = KeepAsync(conn);
            Task late = null;
            if (_stopping) // StopAsync ran while we connected and did not see this socket
                late = conn.CloseAsync(ReconnectPolicy.Normal, "client stopped", true);
            try
            {
                return await ReceiveAsync(conn).ConfigureAwait(false);
            }
            finally
            {
                _current = null;
                conn.Ended.TrySetResult(true);
                await keeper.ConfigureAwait(false);
                if (late != null)
                    await late.ConfigureAwait(false);
                ws.Dispose();
            }
        }

        private async Task<Outcome> ReceiveAsync(Connection conn)
        {
            ClientWebSocket ws = conn.Socket;
            var buffer = new byte[16 * 1024];
            var message = new MemoryStream();
            while (true)
            {
                WebSocketReceiveResult result;
                try
                {
                    conn.ReceiveStarted = Now();
                    conn.Receiving = true;
                    result = await ws.ReceiveAsync(new ArraySegment<byte>(buffer), CancellationToken.None).ConfigureAwait(false);
                }
                catch (Exception ex)
                {
                    return new Outcome(ReconnectPolicy.Abnormal, conn.AbortReason ?? LostReason(ex), conn.Welcomed);
                }
                finally
                {
                    conn.Receiving = false;
                    conn.LastReceived = Now();
                }
                if (result.MessageType == WebSocketMessageType.Close)
                {
                    int code = result.CloseStatus.HasValue ? (int)result.CloseStatus.Value : 1005;
                    string reason = result.CloseStatusDescription ?? "";
                    // Answer the server's close with the same code (1000 for "no code").
                    int answer = code == 1005 || code < 1000 || code == 1006 || code == 1015 ? ReconnectPolicy.Normal : code;
                    await conn.CloseAsync(answer, "", false).ConfigureAwait(false);
                    return new Outcome(code, reason, conn.Welcomed);
                }
                if (message.Length + result.Count > _options.MaxMessageBytes)
                {
                    await conn.CloseAsync(ReconnectPolicy.TooLarge, "message too big", false).ConfigureAwait(false);
                    return new Outcome(ReconnectPolicy.TooLarge, "message over MaxMessageBytes", conn.Welcomed);
                }
                message.Write(buffer, 0, result.Count);
                if (!result.EndOfMessage)
                    continue;
                ServerFrame frame = Decode(result.MessageType, message);
                message.SetLength(0);
                if (frame == null)
                    continue;
                if (!conn.Welcomed)
                {
                    if (frame.Type != "welcome")
                    {
                        await conn.CloseAsync(ReconnectPolicy.ProtocolError, "no welcome", false).ConfigureAwait(false);
                        return new Outcome(ReconnectPolicy.ProtocolError, "first frame was not a welcome", false);
                    }
                    await OnWelcomeAsync(conn, frame).ConfigureAwait(false);
                }
                else if (frame.Type == "message")
                {
                    await OnMessageAsync(conn, frame).ConfigureAwait(false);
                }
                else if (frame.Type == "welcome")
                {
                    await OnWelcomeAsync(conn, frame).ConfigureAwait(false);
                }
                else if (frame.Type == "error")
                {
                    Log(RelayLogLevel.Warning, "client.server_error client_id=" + _options.ClientId + " code=" + frame.Code + " message=" + frame.Message);
                }
                // "pong", and types of later protocol versions, need nothing.
            }
        }

        private ServerFrame Decode(WebSocketMessageType type, MemoryStream message)
        {
            try
            {
                if (type == WebSocketMessageType.Binary)
                    return ServerFrame.FromMessagePack(message.GetBuffer(), (int)message.Length);
                return ServerFrame.FromJson(StrictUtf8.GetString(message.GetBuffer(), 0, (int)message.Length));
            }
            catch (Exception ex)
            {
                Log(RelayLogLevel.Warning, "client.bad_frame client_id=" + _options.ClientId + " error=" + ex.Message);
                return null;
            }
        }

        private async Task OnWelcomeAsync(Connection conn, ServerFrame frame)
        {
            // With nothing replayed, last_id is the head of history: resuming from it loses nothing.
            StreamId head;
            if (frame.Replayed == 0 && frame.LastId != null && StreamId.TryParse(frame.LastId, out head)
                && (!_position.HasValue || head > _position.Value))
                MoveTo(head, true);
            conn.AckSent = null; // a new session has no ack on record
            conn.Welcomed = true;
            Interlocked.Increment(ref _connects);
            Log(RelayLogLevel.Info, "client.connected client_id=" + _options.ClientId + " node=" + frame.Node
                + " recovered=" + (frame.Recovered.HasValue ? frame.Recovered.Value.ToString() : "none") + " replayed=" + frame.Replayed);
            if (frame.Recovered == false)
                Log(RelayLogLevel.Warning, "client.gap client_id=" + _options.ClientId + " last_id=" + frame.LastId);
            if (!_stopping)
                await RaiseAsync(Connected, new ConnectedEventArgs(frame.Recovered, frame.Replayed, frame.LastId, frame.Node, frame.Session)).ConfigureAwait(false);
        }

        private async Task OnMessageAsync(Connection conn, ServerFrame frame)
        {
            StreamId id;
            if (frame.Id == null || !StreamId.TryParse(frame.Id, out id) || frame.BizId == null || frame.Event == null)
            {
                Log(RelayLogLevel.Warning, "client.bad_message client_id=" + _options.ClientId);
                return;
            }
            if (_position.HasValue && id <= _position.Value)
            {
                Interlocked.Increment(ref _duplicates);
                return;
            }
            if (_stopping)
                return; // not handed over, so not passed: the next start replays it
            var args = new MessageReceivedEventArgs(frame.Id, frame.BizId, frame.Event, frame.DataJson, frame.Ts);
            if (!await RaiseAsync(MessageReceived, args).ConfigureAwait(false))
                return;
            MoveTo(id, true);
            if (_options.AutoAck)
            {
                lock (_gate)
                {
                    if (!_ackWanted.HasValue || id > _ackWanted.Value)
                        _ackWanted = id;
                }
            }
        }

        /// <summary>
        /// Raises an event on the captured context (else here) and waits until its handlers
        /// returned. False when the client gave up waiting (stopped) before they ran.
        /// </summary>
        private async Task<bool> RaiseAsync<T>(EventHandler<T> handler, T args) where T : EventArgs
        {
            if (handler == null)
                return true;
            if (_abandon.Task.IsCompleted)
                return false;
            if (_context == null)
            {
                Invoke(handler, args);
                return true;
            }
            var done = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
            _context.Post(state =>
            {
                if (_abandon.Task.IsCompleted)
                {
                    done.TrySetResult(false);
                    return;
                }
                try
                {
                    Invoke(handler, args);
                }
                finally
                {
                    done.TrySetResult(true);
                }
            }, null);
            Task first = await Task.WhenAny(done.Task, _abandon.Task).ConfigureAwait(false);
            return first == done.Task && done.Task.Result;
        }

        private void Invoke<T>(EventHandler<T> handler, T args) where T : EventArgs
        {
            try
            {
                handler(this, args);
            }
            catch (Exception ex)
            {
                // At least once, not forever: an event whose handler throws counts as handled.
                Log(RelayLogLevel.Error, "client.handler_failed client_id=" + _options.ClientId + " event=" + typeof(T).Name + " error=" + ex);
            }
        }

        /// <summary>
        /// Per connection, every tick: no welcome in ConnectTimeout → abort; quiet for
        /// Heartbeat → ping; no frame for 2 × Heartbeat while waiting for one → abort (a
        /// dead peer, e.g. a frozen node or a cut cable, sends no close); send the newest ack.
        /// </summary>
        private async Task KeepAsync(Connection conn)
        {
            TimeSpan heartbeat = _options.Heartbeat;
            double tick = 0.25;
            if (heartbeat > TimeSpan.Zero)
                tick = Math.Max(0.02, Math.Min(tick, heartbeat.TotalSeconds / 4));
            double opened = Now();
            while (!conn.Ended.Task.IsCompleted)
            {
                await Task.WhenAny(conn.Ended.Task, Task.Delay(TimeSpan.FromSeconds(tick))).ConfigureAwait(false);
                if (conn.Ended.Task.IsCompleted)
                    return;
                double now = Now();
                if (!conn.Welcomed)
                {
                    if (now - opened > _options.ConnectTimeout.TotalSeconds)
                        conn.Abort("no welcome from the server");
                    continue;
                }
                if (heartbeat > TimeSpan.Zero)
                {
                    double hb = heartbeat.TotalSeconds;
                    if (conn.Receiving && now - conn.ReceiveStarted > 2 * hb)
                    {
                        conn.Abort("no frame from the server for " + (2 * hb).ToString("0.###", CultureInfo.InvariantCulture) + " s");
                        return;
                    }
                    if (now - conn.LastReceived >= hb && now - conn.LastPing >= hb)
                    {
                        conn.LastPing = now;
                        await conn.SendAsync(ClientFrames.Ping(_options.Format)).ConfigureAwait(false);
                    }
                }
                await SendAckAsync(conn).ConfigureAwait(false);
            }
        }

        private async Task SendAckAsync(Connection conn)
        {
            StreamId? wanted;
            lock (_gate)
                wanted = _ackWanted;
            if (!wanted.HasValue || (conn.AckSent.HasValue && wanted.Value <= conn.AckSent.Value))
                return;
            if (await conn.SendAsync(ClientFrames.Ack(_options.Format, wanted.Value)).ConfigureAwait(false))
                conn.AckSent = wanted;
        }

        // -- small things ----------------------------------------------------------------

        private static readonly Stopwatch Clock = Stopwatch.StartNew();
        private static readonly UTF8Encoding StrictUtf8 = new UTF8Encoding(false, true);

        private static double Now()
        {
            return Clock.Elapsed.TotalSeconds;
        }

        private void Log(RelayLogLevel level, string text)
        {
            var log = _options.Log;
            if (log == null)
                return;
            try
            {
                log(level, text);
            }
            catch (Exception)
            {
                // A logger's failure must not stop the client.
            }
        }

        /// <summary>
        /// Why a receive failed. One case is the platform's, not the network's: the
        /// WebSocket of Mono and of .NET before 8 (dotnet/runtime#82602) accepts only the
        /// close codes of RFC 6455's first list, so a close with 1012 (draining) or 1013
        /// arrives as a "Faulted" abort and the code is lost. The client then reconnects as
        /// after any lost connection: within BackoffBase, and resumes.
        /// </summary>
        private static string LostReason(Exception ex)
        {
            Exception inner = ex;
            while (inner.InnerException != null)
                inner = inner.InnerException;
            var ws = inner as WebSocketException;
            if (ws != null && ws.WebSocketErrorCode == WebSocketError.Faulted)
                return "connection lost: this platform's WebSocket refused a frame from the server"
                       + " (Mono and .NET before 8 refuse close codes 1012 and 1013)";
            return "connection lost: " + Innermost(ex);
        }

        private static string Innermost(Exception ex)
        {
            while (ex.InnerException != null && !(ex is WebSocketException && ex.Message.Contains("status code")))
                ex = ex.InnerException;
            return ex.GetType().Name + ": " + ex.Message;
        }

        private static string Redact(string text, string token)
        {
            if (string.IsNullOrEmpty(token))
                return text;
            return text.Replace(Uri.EscapeDataString(token), "***").Replace(token, "***");
        }

        /// <summary>Names this client object in <c>attempt=</c>: 16 of A-Z a-z 0-9.</summary>
        private static string NewInstanceName()
        {
            const string alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
            var bytes = new byte[16];
            using (var rng = RandomNumberGenerator.Create())
                rng.GetBytes(bytes);
            var sb = new StringBuilder(16);
            foreach (byte b in bytes)
                sb.Append(alphabet[b % alphabet.Length]);
            return sb.ToString();
        }

        private struct Outcome
        {
            public readonly int Code;
            public readonly string Reason;
            public readonly bool Welcomed;

            public Outcome(int code, string reason, bool welcomed)
            {
                Code = code;
                Reason = reason ?? "";
                Welcomed = welcomed;
            }
        }

        /// <summary>One WebSocket and what the loop and the keeper share about it.</summary>
        private sealed class Connection
        {
            private readonly RelayClient _client;
            private readonly SemaphoreSlim _sendLock = new SemaphoreSlim(1, 1);
            private bool _closeSent; // under _sendLock

            public readonly ClientWebSocket Socket;
            public readonly TaskCompletionSource<bool> Ended =
                new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
            public volatile bool Welcomed;
            public volatile bool Receiving;
            public volatile string AbortReason;
            public double ReceiveStarted; // read across threads: a torn double is harmless here
            public double LastReceived;
            public double LastPing;
            public StreamId? AckSent; // the keeper's; the loop resets it at a welcome

            public Connection(RelayClient client, ClientWebSocket socket)
            {
                _client = client;
                Socket = socket;
                LastReceived = Now();
            }

            public void Abort(string reason)
            {
                if (AbortReason == null)
                    AbortReason = reason;
                try
                {
                    Socket.Abort();
                }
                catch (Exception)
                {
                }
            }

            /// <summary>Sends one frame; false when the socket is closing or gone.</summary>
            public async Task<bool> SendAsync(byte[] payload)
            {
                var type = _client._options.Format == RelayFormat.MessagePack ? WebSocketMessageType.Binary : WebSocketMessageType.Text;
                await _sendLock.WaitAsync().ConfigureAwait(false);
                try
                {
                    if (_closeSent || Socket.State != WebSocketState.Open)
                        return false;
                    using (var cts = new CancellationTokenSource(_client._options.ConnectTimeout))
                        await Socket.SendAsync(new ArraySegment<byte>(payload), type, true, cts.Token).ConfigureAwait(false);
                    return true;
                }
                catch (Exception)
                {
                    return false; // the receive side notices and reports the close
                }
                finally
                {
                    _sendLock.Release();
                }
            }

            /// <summary>
            /// Our close frame (once). <paramref name="wait"/>: we start the close, so send the
            /// pending ack first and wait up to CloseTimeout for the server's close frame.
            /// </summary>
            public async Task CloseAsync(int code, string reason, bool wait)
            {
                if (wait && Welcomed)
                    await _client.SendAckAsync(this).ConfigureAwait(false);
                await _sendLock.WaitAsync().ConfigureAwait(false);
                try
                {
                    if (_closeSent)
                        return;
                    _closeSent = true;
                    if (Socket.State == WebSocketState.Open || Socket.State == WebSocketState.CloseReceived)
                    {
                        using (var cts = new CancellationTokenSource(_client._options.CloseTimeout))
                            await Socket.CloseOutputAsync((WebSocketCloseStatus)code, reason, cts.Token).ConfigureAwait(false);
                    }
                }
                catch (Exception)
                {
                    // Already gone: the receive side reports it.
                }
                finally
                {
                    _sendLock.Release();
                }
                if (!wait)
                    return;
                Task first = await Task.WhenAny(Ended.Task, Task.Delay(_client._options.CloseTimeout)).ConfigureAwait(false);
                if (first != Ended.Task)
                    Abort("no close frame from the server");
            }
        }
    }
}
