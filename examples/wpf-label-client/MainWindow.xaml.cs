using System;
using System.Collections.Generic;
using System.ComponentModel;
using System.Net;
using System.Net.Http;
using System.Threading;
using System.Threading.Tasks;
using System.Windows;
using System.Windows.Controls;
using System.Windows.Input;
using System.Windows.Media;
using Newtonsoft.Json.Linq;
using Relay.Client;

namespace WpfLabelClient
{
    /// <summary>
    /// The label canvas of the original WPF app, on Relay.Client instead of WebSocketSharp:
    /// no Dispatcher.Invoke (events arrive on this window's thread), no retry limit, no
    /// label lost while the connection was down.
    /// </summary>
    public partial class MainWindow : Window
    {
        private static readonly HttpClient Http = new HttpClient { Timeout = TimeSpan.FromSeconds(10) };

        private readonly Settings _settings;
        private readonly Dictionary<long, Border> _labels = new Dictionary<long, Border>();
        private RelayClient _client;
        private List<MessageReceivedEventArgs> _heldDuringReload; // non-null while reloading
        private bool _stopped;

        public MainWindow(Settings settings)
        {
            _settings = settings;
            InitializeComponent();
            Title = "Labels of " + settings.ClientId;
            Loaded += OnLoaded;
            Closing += OnClosing;
        }

        private void OnLoaded(object sender, RoutedEventArgs e)
        {
            _client = new RelayClient(new RelayClientOptions
            {
                Url = _settings.RelayUrl,
                ClientId = _settings.ClientId,
                TokenProvider = GetTokenAsync,
                // No CursorStore: the labels live in this window's memory, so a restarted app
                // reloads them from the backend anyway (Recovered is null on the first
                // connect). An app that keeps its state on disk would keep the cursor beside
                // it with a FileCursorStore and resume exactly where it stopped.
            });
            _client.Connected += OnConnected;
            _client.MessageReceived += OnMessage;
            _client.Disconnected += OnDisconnected;
            // Start() on the UI thread: every event above is raised on this Dispatcher.
            _client.Start();
        }

        private async void OnClosing(object sender, CancelEventArgs e)
        {
            if (_stopped || _client == null)
                return;
            // Close cleanly (pending ack, close frame 1000) without blocking the UI thread:
            // cancel this close, await the stop, then close again.
            e.Cancel = true;
            _stopped = true;
            ConnectionText.Text = "closing";
            await _client.StopAsync();
            _client.Dispose();
            Close();
        }

        // -- Relay events (all on the UI thread) ---------------------------------------------

        private void OnConnected(object sender, ConnectedEventArgs e)
        {
            ConnectionText.Text = "connected to " + e.Node;
            // null: first connect of this process; false: the node could not replay the gap.
            // Either way the canvas is rebuilt from the backend. true: the replay follows.
            if (e.Recovered != true)
                ReloadLabels();
        }

        private void OnMessage(object sender, MessageReceivedEventArgs e)
        {
            if (_heldDuringReload != null)
                _heldDuringReload.Add(e); // applied on top of the snapshot when it arrives
            else
                Apply(e);
        }

        private void OnDisconnected(object sender, DisconnectedEventArgs e)
        {
            if (e.WillReconnect)
                ConnectionText.Text = string.Format("reconnecting in {0:0.0} s ({1} {2})", e.ReconnectDelay.TotalSeconds, e.Code, e.Reason);
            else if (e.Code == 4000)
                ConnectionText.Text = "another window took over " + _settings.ClientId;
            else if (!_stopped)
                ConnectionText.Text = "stopped: " + e.Code + " " + e.Reason;
        }

        // -- labels ----------------------------------------------------------------------------

        private void Apply(MessageReceivedEventArgs e)
        {
            JToken data = e.DataToken();
            long id = (long)data["id"];
            if (e.Event == "label.created")
                ShowLabel(id, (string)data["text"]);
            else if (e.Event == "label.deleted")
                RemoveLabel(id);
        }

        private async void ReloadLabels()
        {
            if (_heldDuringReload != null)
                return; // one reload at a time; it applies what arrives meanwhile
            _heldDuringReload = new List<MessageReceivedEventArgs>();
            try
            {
                string url = _settings.BackendUrl + "/labels?biz_id=" + Uri.EscapeDataString(_settings.ClientId);
                JObject body = JObject.Parse(await Http.GetStringAsync(url));
                foreach (var label in new List<long>(_labels.Keys))
                    RemoveLabel(label);
                foreach (JToken label in body["labels"])
                    ShowLabel((long)label["id"], (string)label["text"]);
            }
            catch (Exception ex)
            {
                SelectionText.Text = "could not load the labels: " + ex.Message;
            }
            finally
            {
                List<MessageReceivedEventArgs> held = _heldDuringReload;
                _heldDuringReload = null;
                foreach (var e in held)
                    Apply(e); // creating or deleting twice is harmless: both are idempotent
            }
        }

        private void ShowLabel(long id, string text)
        {
            if (_labels.ContainsKey(id))
                return;
            var label = new Border
            {
                Uid = id.ToString(),
                Width = 100,
                Height = 50,
                Background = Brushes.LightYellow,
                BorderBrush = Brushes.DarkGoldenrod,
                BorderThickness = new Thickness(1),
                CornerRadius = new CornerRadius(4),
                Child = new TextBlock { Text = text, TextWrapping = TextWrapping.Wrap, Margin = new Thickness(4) },
                Cursor = Cursors.Hand,
            };
            label.MouseLeftButtonDown += (sender, args) => SelectionText.Text = "label " + id + ": " + text;
            // The original placed each label at a fixed spot; here the id picks a cell.
            Canvas.SetLeft(label, 20 + (id % 8) * 115);
            Canvas.SetTop(label, 20 + (id / 8 % 8) * 65);
            Cav.Children.Add(label);
            _labels[id] = label;
        }

        private void RemoveLabel(long id)
        {
            Border label;
            if (!_labels.TryGetValue(id, out label))
                return;
            Cav.Children.Remove(label);
            _labels.Remove(id);
        }

        // -- the backend -----------------------------------------------------------------------

        /// <summary>A connection token from the backend (examples/label_service's /token); null when it issues none.</summary>
        private async Task<string> GetTokenAsync(CancellationToken cancel)
        {
            string url = _settings.BackendUrl + "/token/" + Uri.EscapeDataString(_settings.ClientId);
            using (HttpResponseMessage response = await Http.GetAsync(url, cancel).ConfigureAwait(false))
            {
                if (response.StatusCode == HttpStatusCode.NotFound)
                    return null; // the service runs without --relay-secret: nodes allow anonymous
                response.EnsureSuccessStatusCode();
                string body = await response.Content.ReadAsStringAsync().ConfigureAwait(false);
                return (string)JObject.Parse(body)["token"];
            }
        }
    }
}
